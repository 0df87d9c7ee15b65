"""The Delta layer against real Delta tables: writes from Spark, MERGE, partition overwrite,
time travel, compaction, vacuum, idempotency, concurrency and contract enforcement."""

from __future__ import annotations

import json
import multiprocessing
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from moonpipe import delta
from schemas.contract import Column as C
from schemas.contract import ContractViolation, TableContract

EVENTS = TableContract(
    name="test_events",
    doc="A small table with every kind of column the pipeline's contracts use.",
    key=("item_id",),
    partition_by=("day",),
    columns=(
        C("item_id", "string", nullable=False),
        C("day", "date", nullable=False),
        C("score", "float64"),
        C("count", "int64"),
        C("vector", "array<float32>"),
        C("tags", "map<string,string>"),
        C("content_hash", "string", nullable=False),
        C("at", "timestamp"),
    ),
)
D1, D2 = date(2026, 11, 1), date(2026, 11, 2)
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def rows(ids, day, score=1.0, tag="a"):
    return [
        (f"p{i:03d}", day, score * i, i, [float(i), 0.5], {"tag": tag}, f"h{i}-{tag}", T0) for i in ids
    ]


def frame(spark, data, partitions=2):
    return spark.createDataFrame(data, EVENTS.spark_schema()).repartition(partitions)


def current(spark, uri, **kwargs):
    return {r.item_id: r for r in delta.read(spark, uri, **kwargs).collect()}


def test_write_from_spark_is_one_commit_with_per_partition_files(spark, table_uri):
    data = rows(range(10), D1) + rows(range(10, 16), D2)
    result = delta.write(frame(spark, data, partitions=3), table_uri, EVENTS)

    assert result.rows_written == 16 and not result.skipped
    ops = [c["operation"] for c in delta.history(table_uri)]
    assert ops == ["WRITE", "CREATE TABLE"]  # the whole Spark write is ONE commit
    actions = delta.file_actions(table_uri).to_pylist()
    assert len(actions) == result.files_added and 2 <= len(actions) <= 6  # <= 3 tasks x 2 days
    assert {a["partition.day"] for a in actions} == {D1, D2}
    assert sum(a["num_records"] for a in actions) == 16
    assert all(a["path"].startswith("day=2026-11-0") for a in actions)

    got = current(spark, table_uri)
    assert len(got) == 16
    assert got["p012"].day == D2 and got["p012"].score == 12.0 and got["p012"].tags == {"tag": "a"}
    assert got["p003"].vector == [3.0, 0.5] and got["p003"].at == T0.replace(tzinfo=None)


def test_add_action_stats_let_readers_skip_files(spark, table_uri):
    delta.write(frame(spark, rows(range(5), D1), partitions=1), table_uri, EVENTS)
    stats = delta.file_actions(table_uri).to_pylist()[0]
    assert stats["num_records"] == 5
    assert stats["min.count"] == 0 and stats["max.count"] == 4
    assert stats["min.item_id"] == "p000" and stats["max.item_id"] == "p004"
    assert stats["null_count.score"] == 0
    assert "min.vector" not in stats  # nested columns carry no bounds


def test_merge_counts_updates_and_inserts(spark, table_uri):
    delta.write(frame(spark, rows(range(10), D1)), table_uri, EVENTS)
    # 0-4 unchanged, 5-7 changed content, 10-12 new
    source = rows(range(5), D1) + rows(range(5, 8), D1, tag="b") + rows(range(10, 13), D1)
    result = delta.merge(
        frame(spark, source), table_uri, EVENTS, delta.MergeSpec(update_condition="s.content_hash <> t.content_hash")
    )
    assert (result.source_rows, result.inserted, result.updated, result.unchanged) == (11, 3, 3, 5)
    got = current(spark, table_uri)
    assert len(got) == 13
    assert got["p006"].tags == {"tag": "b"} and got["p002"].tags == {"tag": "a"} and "p011" in got
    assert not list(Path(table_uri, delta.STAGING_DIR).glob("*"))  # staged source cleaned up
    assert delta.history(table_uri)[0]["operation"] == "MERGE"


def test_merge_from_a_multi_chunk_arrow_table_with_nested_columns(spark, tmp_path):
    """Spark's toArrow() output (one chunk per partition, Spark's nested types) merges by key."""
    from pyspark.sql import functions as F

    from schemas.tables import PRODUCT_EMBEDDINGS

    uri = str(tmp_path / "product_embeddings")
    table = (
        spark.range(10_000)
        .select(
            F.format_string("p%05d", "id").alias("product_id"), F.lit("v1").alias("model_version"),
            F.sha2(F.col("id").cast("string"), 256).alias("content_hash"),
            F.array_repeat(F.col("id").cast("float"), 128).alias("embedding"), F.lit(128).alias("embedding_dim"),
            F.create_map(F.lit("color"), F.lit("red")).alias("attributes"), F.lit(None).cast("string").alias("reasoning"),
            F.lit(D1).alias("snapshot_date"), F.lit(T0).alias("embedded_at"),
        )
    )
    delta.write(table, uri, PRODUCT_EMBEDDINGS)
    delta.merge(table.toArrow(), uri, PRODUCT_EMBEDDINGS)  # the target's files now come from a MERGE
    source = (
        delta.read(spark, uri).orderBy(F.xxhash64("product_id")).limit(100).repartition(2)
        .withColumn("attributes", F.create_map(F.lit("color"), F.lit("blue"))).toArrow()
    )
    assert source.column("attributes").num_chunks == 2
    result = delta.merge(source, uri, PRODUCT_EMBEDDINGS, delta.MergeSpec(extra_predicate="t.model_version = 'v1'"))
    assert (result.updated, result.inserted) == (100, 0)
    colors = [dict(a)["color"] for a in delta.read_arrow(uri, columns=["attributes"]).column("attributes").to_pylist()]
    assert len(colors) == 10_000 and colors.count("blue") == 100


def test_merge_can_flag_rows_missing_from_the_source(spark, table_uri):
    flagged = TableContract(
        name="test_flagged",
        doc="",
        key=("item_id",),
        columns=(C("item_id", "string", nullable=False), C("deleted", "bool", nullable=False)),
    )
    delta.write(pa.table({"item_id": ["a", "b", "c"], "deleted": [False] * 3}), table_uri, flagged)
    result = delta.merge(
        pa.table({"item_id": ["a", "d"], "deleted": [False, False]}),
        table_uri,
        flagged,
        delta.MergeSpec(not_matched_by_source_set={"deleted": "true"}, not_matched_by_source_condition="t.deleted = false"),
    )
    got = {r["item_id"]: r["deleted"] for r in delta.read_arrow(table_uri).to_pylist()}
    assert got == {"a": False, "b": True, "c": True, "d": False}
    assert (result.inserted, result.updated) == (1, 3)  # a re-written + b, c flagged


def test_replace_partition_keeps_other_days_and_is_idempotent(spark, table_uri):
    delta.write(frame(spark, rows(range(6), D1) + rows(range(6, 9), D2)), table_uri, EVENTS)
    day2 = frame(spark, rows(range(20, 24), D2, tag="new"))
    first = delta.write(day2, table_uri, EVENTS, mode="overwrite", replace_where={"day": D2})
    after_first = current(spark, table_uri)
    second = delta.write(day2, table_uri, EVENTS, mode="overwrite", replace_where={"day": D2})
    after_second = current(spark, table_uri)

    assert first.rows_written == second.rows_written == 4
    assert sorted(after_first) == sorted(after_second)  # rerun: same table content
    assert {k for k, r in after_second.items() if r.day == D1} == {f"p{i:03d}" for i in range(6)}
    assert {k for k, r in after_second.items() if r.day == D2} == {f"p{i:03d}" for i in range(20, 24)}


def test_replace_partition_rejects_rows_of_other_partitions(spark, table_uri):
    with pytest.raises(ContractViolation, match=r"replace_where .* day='2026-11-01'"):
        delta.write(frame(spark, rows(range(3), D1)), table_uri, EVENTS, mode="overwrite", replace_where={"day": D2})


def test_time_travel_by_version_and_timestamp(spark, table_uri):
    v1 = delta.write(frame(spark, rows(range(3), D1)), table_uri, EVENTS).version
    time.sleep(1.1)  # commits a second apart, so a time between them is unambiguous
    delta.write(frame(spark, rows(range(3, 8), D1)), table_uri, EVENTS)
    assert len(current(spark, table_uri)) == 8
    assert sorted(current(spark, table_uri, version=v1)) == ["p000", "p001", "p002"]
    first, second = (c["timestamp"] for c in reversed(delta.history(table_uri, limit=2)))
    as_of = datetime.fromtimestamp((first + second) / 2000, tz=timezone.utc)
    assert len(delta.read(spark, table_uri, as_of=as_of).collect()) == 3
    assert delta.read_arrow(table_uri, version=v1).num_rows == 3


def test_compact_and_vacuum(spark, table_uri):
    for start in range(0, 20, 5):  # four appends of five rows -> many small files
        delta.write(frame(spark, rows(range(start, start + 5), D1), partitions=2), table_uri, EVENTS)
    before = delta.file_actions(table_uri).num_rows
    metrics = delta.compact(table_uri)
    after = delta.file_actions(table_uri).num_rows
    assert before >= 4 and after == 1 and metrics["numFilesRemoved"] == before
    assert len(current(spark, table_uri)) == 20
    assert delta.vacuum(table_uri, retention_hours=0, dry_run=True)  # old files are listed...
    removed = delta.vacuum(table_uri, retention_hours=0)
    assert len(removed) == before  # ...and removed; the current snapshot is intact
    assert len(list(Path(table_uri).rglob("*.parquet"))) == 1
    assert len(current(spark, table_uri)) == 20


def test_every_writer_keeps_the_contracts_row_group_size(spark, table_uri):
    """Spark writes, MERGE and compaction all cap Parquet row groups at the contract's size."""
    import dataclasses

    import pyarrow.parquet as pq

    small_groups = dataclasses.replace(EVENTS, row_group_rows=4)

    def largest_group() -> int:
        sizes = []
        for path in Path(table_uri).rglob("*.parquet"):
            meta = pq.ParquetFile(path).metadata
            sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return max(sizes)

    delta.write(frame(spark, rows(range(30), D1), partitions=1), table_uri, small_groups)
    assert largest_group() == 4
    delta.merge(frame(spark, rows(range(20, 40), D1, tag="b")), table_uri, small_groups)
    delta.vacuum(table_uri, retention_hours=0)  # only the files MERGE wrote and the untouched ones
    assert largest_group() == 4
    delta.compact(table_uri, small_groups)
    delta.vacuum(table_uri, retention_hours=0)
    assert largest_group() == 4 and len(current(spark, table_uri)) == 40


def test_idempotency_key_makes_a_repeated_write_a_no_op(spark, table_uri):
    df = frame(spark, rows(range(4), D1))
    first = delta.write(df, table_uri, EVENTS, idempotency_key=("test-job", 20261101))
    again = delta.write(df, table_uri, EVENTS, idempotency_key=("test-job", 20261101))
    assert not first.skipped and again.skipped and again.version == first.version
    assert len(delta.read(spark, table_uri).collect()) == 4


def test_contract_violations_name_table_column_and_expectation(spark, table_uri):
    wrong_type = spark.createDataFrame([("p1", D1, "high")], "item_id string, day date, score string")
    with pytest.raises(ContractViolation) as missing:
        delta.write(wrong_type, table_uri, EVENTS)
    message = str(missing.value)
    assert "'test_events'" in message and "column 'score': expected float64" in message
    assert "column 'content_hash' is missing" in message and "schemas/tables.py" in message

    loose = EVENTS.spark_schema()
    for field in loose.fields:
        field.nullable = True  # a writer that forgot the rule: nulls reach the executors
    nulls = spark.createDataFrame([("p1", D1, 1.0, 1, None, None, None, None)], loose)
    with pytest.raises(ContractViolation, match=r"column 'content_hash' is non-nullable but has 1 null"):
        delta.write(nulls, table_uri, EVENTS)
    assert delta.read_arrow(table_uri).num_rows == 0  # nothing was committed


def test_additive_columns_are_allowed(spark, table_uri):
    delta.write(frame(spark, rows(range(2), D1)), table_uri, EVENTS)
    wider = frame(spark, rows(range(2, 4), D1)).selectExpr("*", "'x' AS note")
    delta.write(wider, table_uri, EVENTS)
    got = current(spark, table_uri)
    assert got["p003"].note == "x" and got["p000"].note is None


def test_tables_stay_readable_by_delta_spark(spark, table_uri):
    delta.write(frame(spark, rows(range(3), D1)), table_uri, EVENTS)
    delta.merge(frame(spark, rows(range(2, 5), D1, tag="b")), table_uri, EVENTS)
    protocol = delta.open_table(table_uri).protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
    assert not protocol.reader_features and not protocol.writer_features
    log = "\n".join(p.read_text() for p in sorted(Path(table_uri, "_delta_log").glob("*.json")))
    assert "deletionVector" not in log and "columnMapping" not in log
    metadata = json.loads(next(line for line in log.splitlines() if '"metaData"' in line))["metaData"]
    assert metadata["partitionColumns"] == ["day"]
    assert json.loads(metadata["schemaString"])["fields"][7]["type"] == "timestamp"  # not timestamp_ntz


def test_reading_an_empty_table_gives_the_contract_schema(spark, table_uri):
    delta.ensure_table(table_uri, EVENTS)
    empty = delta.read(spark, table_uri)
    assert empty.count() == 0 and empty.columns == EVENTS.column_names


def test_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Delta table at"):
        delta.read_arrow(str(tmp_path / "nope"))


def _append_many(uri: str, writer: int, commits: int) -> None:
    for n in range(commits):
        ids = [f"w{writer}-{n}-{i}" for i in range(7)]
        data = pa.table(
            {
                "item_id": ids,
                "day": pa.array([D1] * 7, pa.date32()),
                "score": [1.0] * 7,
                "count": pa.array(range(7), pa.int64()),
                "vector": pa.array([[0.0]] * 7, pa.list_(pa.float32())),
                "tags": pa.array([[("w", str(writer))]] * 7, pa.map_(pa.string(), pa.string())),
                "content_hash": ids,
                "at": pa.array([T0] * 7, pa.timestamp("us", tz="UTC")),
            }
        )
        if n % 2:
            delta.merge(data, uri, EVENTS)  # upserts race the other writer's appends
        else:
            delta.write(data, uri, EVENTS)


def test_concurrent_writers_lose_no_rows(table_uri):
    delta.ensure_table(table_uri, EVENTS)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(table_uri, w, 10)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    table = delta.read_arrow(table_uri)
    assert table.num_rows == 2 * 10 * 7
    assert len(set(table.column("item_id").to_pylist())) == 140
    assert delta.version(table_uri) == 20  # CREATE + 20 commits, none lost
