"""Ingest one dated catalog snapshot: schema check -> Great Expectations -> quarantine + products MERGE.

    reader    the snapshot folder (Parquet or JSON Lines; images inline or as files beside it)
    validate  the input contract, then GX row rules (bad rows -> quarantine with reasons) and batch
              rules (a collapsed or duplicate-ridden snapshot stops the run before anything is written)
    writers   quarantine: the date's ingest partition replaced; products: MERGE by product_id with a
              content hash; products missing from the snapshot are flagged deleted, never removed

Every input row ends in exactly one place (products or quarantine); the run checks it. Rerunning a
date leaves the same tables.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from moonpipe import delta, storage
from moonpipe.progress import stage
from moonpipe.settings import Settings, local_path
from schemas.contract import ContractViolation
from schemas.tables import CATALOG_SNAPSHOT, PRODUCTS, QUARANTINE

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

LOG = logging.getLogger("moonpipe.jobs.ingest")
STAGE = "ingest"
# Fields the models read: a change in any of them means the product must be embedded again.
CONTENT_FIELDS = ("title", "description", "category_path", "brand", "attributes", "image_bytes")


class SnapshotRejected(RuntimeError):
    """A batch-level rule failed: the snapshot as a whole is not trustworthy; nothing was written."""


class ConservationError(RuntimeError):
    """Rows went missing or were counted twice between input and outputs."""


@dataclass
class IngestSummary:
    snapshot_date: str
    source_uri: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    products_version: int | None = None
    quarantine_version: int | None = None
    data_docs: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- reader ------------------------------------------------------------------------------------------


def _snapshot_files(snapshot_uri: str) -> tuple[str, list[str]]:
    for fmt, suffixes in (("parquet", (".parquet",)), ("json", (".jsonl", ".json"))):
        files = [f for suffix in suffixes for f in storage.list_files(snapshot_uri, suffix)]
        if files:
            return fmt, files
    raise FileNotFoundError(
        f"no catalog snapshot at {snapshot_uri}: expected *.parquet or *.jsonl files there "
        f"(build the samples with `moonpipe snapshots build`, or check the date)"
    )


def read_snapshot(spark: "SparkSession", snapshot_uri: str) -> "DataFrame":
    """The snapshot's rows in contract columns plus ``source_row`` and ``image_load_error``.

    JSON Lines carry images as ``image_uri`` (a path relative to the snapshot, or absolute) or as
    base64 ``image_bytes``. Files named by ``image_uri`` are read on the executors.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType

    fmt, files = _snapshot_files(snapshot_uri)
    if fmt == "parquet":
        frame = spark.read.parquet(*files)
        try:
            CATALOG_SNAPSHOT.check_spark_schema(frame.schema)
        except ContractViolation as error:
            raise ContractViolation(f"snapshot {snapshot_uri}: {error}") from None
    else:
        schema = CATALOG_SNAPSHOT.spark_schema()
        json_schema = schema.__class__(
            [f if f.name != "image_bytes" else f.__class__("image_bytes", StringType(), True) for f in schema.fields]
        )
        frame = spark.read.schema(json_schema).option("mode", "PERMISSIVE").json(files)
        frame = frame.withColumn("image_bytes", F.unbase64("image_bytes").cast(BinaryType()))
    # Stable for the same files: position within the files as Spark splits them.
    frame = frame.select(*CATALOG_SNAPSHOT.column_names).withColumn("source_row", F.monotonically_increasing_id())
    return _load_image_files(frame, snapshot_uri)


def _load_image_files(frame: "DataFrame", snapshot_uri: str) -> "DataFrame":
    """Fill ``image_bytes`` from ``image_uri`` where needed; ``image_load_error`` says why one failed."""
    import pyarrow as pa
    from pyspark.sql.types import StringType, StructField, StructType

    # A new StructType: StructType.add would change the frame's cached schema in place.
    schema = StructType([*frame.schema.fields, StructField("image_load_error", StringType())])

    def load(batches):
        for batch in batches:
            table = pa.Table.from_batches([batch])
            images = table.column("image_bytes").to_pylist()
            uris = table.column("image_uri").to_pylist()
            errors: list[str | None] = [None] * len(images)
            for i, (data, uri) in enumerate(zip(images, uris)):
                if data is not None or not uri:
                    continue
                target = uri if ("://" in uri or uri.startswith("/")) else f"{snapshot_uri}/{uri}"
                try:
                    filesystem, path = storage.resolve(target)
                    with filesystem.open_input_stream(path) as stream:
                        images[i] = stream.read()
                except (OSError, ValueError) as error:
                    errors[i] = f"image file {uri!r} could not be read: {error}"
            table = table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes", pa.array(images, pa.binary()))
            table = table.append_column("image_load_error", pa.array(errors, pa.string()))
            yield from table.to_batches()

    return frame.mapInArrow(load, schema)


# -- products rows -------------------------------------------------------------------------------------


def content_hash_column() -> Any:
    """SHA-256 over what the models read, with attributes in key order so that map order does not matter."""
    from pyspark.sql import functions as F

    attributes = F.to_json(F.array_sort(F.map_entries(F.coalesce("attributes", F.create_map().cast("map<string,string>")))))
    parts = [F.coalesce(F.col(c), F.lit("")) for c in ("title", "description", "category_path", "brand")]
    return F.sha2(F.concat_ws("\u0001", *parts, attributes, F.sha2(F.col("image_bytes"), 256)), 256)


def _products_source(valid: "DataFrame", snapshot_date: date) -> "DataFrame":
    from pyspark.sql import functions as F

    now = datetime.now(timezone.utc)
    return valid.select(
        "product_id", "title", "description", "category_path", "brand", "attributes", "price", "currency",
        "image_bytes", "source",
        content_hash_column().alias("content_hash"),
        F.lit(snapshot_date).alias("first_seen_date"),
        F.lit(snapshot_date).alias("last_changed_date"),
        F.lit(False).alias("is_deleted"),
        F.lit(None).cast("date").alias("deleted_date"),
        F.lit(now).alias("updated_at"),
    )


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _products_merge_spec(snapshot_date: date, present_but_rejected: list[str]) -> delta.MergeSpec:
    """MERGE by id: changed rows updated (first-seen date kept), new rows inserted, and products the
    snapshot no longer has flagged deleted. A product whose row was quarantined is still in the
    snapshot: it keeps its last good version instead of being flagged."""
    day = snapshot_date.isoformat()
    not_deleted = "t.is_deleted = false"
    if present_but_rejected:
        not_deleted += f" AND t.product_id NOT IN ({', '.join(_sql_string(i) for i in present_but_rejected)})"
    # Parenthesised: DataFusion binds IS DISTINCT FROM looser than OR.
    changed = " OR ".join(
        ["(t.is_deleted)", "(s.content_hash <> t.content_hash)"]
        + [f"(s.{c} IS DISTINCT FROM t.{c})" for c in ("price", "currency", "source")]
    )
    keep_first_seen = {c: f"s.{c}" for c in PRODUCTS.column_names if c not in ("product_id", "first_seen_date")}
    return delta.MergeSpec(
        update_condition=changed,
        update_set=keep_first_seen,
        insert=True,
        not_matched_by_source_set={
            "is_deleted": "true",
            "deleted_date": f"CAST('{day}' AS DATE)",
            "last_changed_date": f"CAST('{day}' AS DATE)",
            "updated_at": "now()",
        },
        not_matched_by_source_condition=not_deleted,
    )


# -- quarantine rows -------------------------------------------------------------------------------------


def quarantine_frame(
    spark: "SparkSession",
    rows: "DataFrame",
    reasons: dict[int, list[tuple[str, str]]],
    *,
    stage_name: str,
    snapshot_date: date,
    source_uri: str,
) -> "DataFrame":
    """Quarantine rows for ``reasons`` (source_row -> [(code, message)]): the raw row as JSON
    (binary fields summarised by size) and the raw image bytes."""
    from pyspark.sql import functions as F

    listed = spark.createDataFrame(
        [(row, ",".join(c for c, _ in found), "; ".join(m for _, m in found)) for row, found in sorted(reasons.items())],
        "source_row long, reason_code string, reason string",
    )
    data_columns = [c for c in rows.columns if c not in ("image_bytes", "source_row", "image_load_error")]
    raw_json = F.to_json(
        F.struct(
            *[F.col(c) for c in data_columns],
            F.length("image_bytes").alias("image_bytes_length"),
        )
    )
    return (
        rows.join(F.broadcast(listed), "source_row")
        .select(
            F.lit(stage_name).alias("stage"),
            F.lit(snapshot_date).alias("snapshot_date"),
            F.lit(source_uri).alias("source_uri"),
            F.col("source_row"),
            F.col("product_id"),
            F.col("reason_code"),
            F.col("reason"),
            raw_json.alias("raw_row"),
            F.col("image_bytes").alias("raw_image"),
            F.lit(datetime.now(timezone.utc)).alias("quarantined_at"),
        )
    )


# -- the job -----------------------------------------------------------------------------------------


def ingested_snapshots(settings: Settings) -> dict[str, int]:
    """Snapshot dates already merged into products, with their input row counts (from the commits)."""
    uri = settings.table_uri(PRODUCTS.name)
    if not delta.exists(uri):
        return {}
    return {
        c["moonpipe.snapshot_date"]: int(c["moonpipe.rows_in"])
        for c in delta.history(uri)
        if c.get("moonpipe.job") == "ingest" and "moonpipe.rows_in" in c
    }


def _previous_rows(ingested: dict[str, int], snapshot_date: date) -> int | None:
    earlier = [day for day in ingested if day < snapshot_date.isoformat()]
    return ingested[max(earlier)] if earlier else None


def ingest(
    snapshot_date: date,
    settings: Settings | None = None,
    spark: "SparkSession | None" = None,
    source_uri: str | None = None,
    limits: Any = None,
    allow_older: bool = False,
) -> IngestSummary:
    """Validate ``snapshot_date``'s snapshot and bring products and quarantine up to date with it.

    A date older than the newest one already ingested would roll products back: refused unless
    ``allow_older`` (e.g. rebuilding history date by date into an empty table)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from jobs.catalog_validation import ValidationLimits, validate_snapshot
    from moonpipe.spark_session import get_spark

    settings = settings or Settings.from_env()
    spark = spark or get_spark()
    source_uri = source_uri or settings.snapshot_uri(snapshot_date.isoformat())
    summary = IngestSummary(snapshot_date.isoformat(), source_uri)
    ingested = ingested_snapshots(settings)
    newest = max(ingested, default=None)
    if newest and newest > snapshot_date.isoformat() and not allow_older:
        raise ValueError(
            f"products already reflect snapshot {newest}, newer than {snapshot_date}: ingesting it would roll "
            f"products back. Ingest dates in order (a rerun of {newest} is fine), or pass --allow-older"
        )
    run_dir = f"{settings.home}/runs/ingest/{snapshot_date.isoformat()}"
    clock = time.perf_counter()

    with stage(f"ingest {snapshot_date}: read", LOG) as record:
        rows = read_snapshot(spark, source_uri).persist(StorageLevel.MEMORY_AND_DISK)
        summary.rows_in = record.rows = rows.count()
    summary.seconds["read"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    with stage(f"ingest {snapshot_date}: validate (Great Expectations)", LOG):
        verdict = validate_snapshot(
            rows,
            snapshot_date=snapshot_date.isoformat(),
            previous_rows=_previous_rows(ingested, snapshot_date),
            docs_dir=f"{run_dir}/data_docs",
            limits=limits or ValidationLimits(),
        )
        summary.data_docs = verdict.docs_index
    summary.seconds["validate"] = round(time.perf_counter() - clock, 2)
    if not verdict.batch_ok:
        rows.unpersist()
        raise SnapshotRejected(
            f"snapshot {snapshot_date} rejected, nothing written: " + " | ".join(verdict.batch_failures)
            + (f" (report: {verdict.docs_index})" if verdict.docs_index else "")
        )

    bad_rows = sorted(verdict.row_reasons)
    valid = rows.where(~F.col("source_row").isin(bad_rows)) if bad_rows else rows
    source = _products_source(valid, snapshot_date)
    to_merge = source.count()
    if to_merge + len(bad_rows) != summary.rows_in:  # checked before anything is written
        rows.unpersist()
        raise ConservationError(
            f"snapshot {snapshot_date}: {summary.rows_in} rows in, but {to_merge} to merge + "
            f"{len(bad_rows)} to quarantine = {to_merge + len(bad_rows)}; nothing was written"
        )
    for found in verdict.row_reasons.values():
        for code, _ in found:
            summary.quarantine_reasons[code] = summary.quarantine_reasons.get(code, 0) + 1
    clock = time.perf_counter()
    with stage(f"ingest {snapshot_date}: quarantine", LOG) as record:
        quarantined = quarantine_frame(
            spark, rows, verdict.row_reasons, stage_name=STAGE, snapshot_date=snapshot_date, source_uri=source_uri
        )
        result = delta.write(
            quarantined,
            settings.table_uri(QUARANTINE.name),
            QUARANTINE,
            mode="overwrite",
            replace_where={"stage": STAGE, "snapshot_date": snapshot_date},
            metadata={"moonpipe.job": "ingest", "moonpipe.snapshot_date": snapshot_date.isoformat()},
        )
        summary.rows_quarantined = record.rows = result.rows_written
        summary.quarantine_version = result.version
    summary.seconds["quarantine"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    with stage(f"ingest {snapshot_date}: merge products", LOG) as record:
        products_uri = settings.table_uri(PRODUCTS.name)
        rejected_ids = sorted(
            {r.product_id for r in rows.where(F.col("source_row").isin(bad_rows)).select("product_id").collect()
             if r.product_id and r.product_id.strip()}
        ) if bad_rows else []
        newly_deleted = 0
        if delta.exists(products_uri):
            live = delta.read(spark, products_uri).where("NOT is_deleted").select("product_id")
            newly_deleted = live.join(rows.select("product_id"), "product_id", "left_anti").count()
        merged = delta.merge(
            source,
            products_uri,
            PRODUCTS,
            _products_merge_spec(snapshot_date, rejected_ids),
            metadata={
                "moonpipe.job": "ingest",
                "moonpipe.snapshot_date": snapshot_date.isoformat(),
                "moonpipe.rows_in": summary.rows_in,
            },
        )
        summary.rows_valid = record.rows = merged.source_rows
        summary.inserted = merged.inserted
        summary.deleted = newly_deleted  # delta-rs counts flagged rows among its updates
        summary.updated = merged.updated - newly_deleted
        summary.unchanged = merged.source_rows - summary.inserted - summary.updated
        summary.products_version = merged.version
    summary.seconds["merge"] = round(time.perf_counter() - clock, 2)
    rows.unpersist()

    if summary.rows_valid + summary.rows_quarantined != summary.rows_in:
        raise ConservationError(
            f"snapshot {snapshot_date}: {summary.rows_in} rows in, but {summary.rows_valid} valid + "
            f"{summary.rows_quarantined} quarantined = {summary.rows_valid + summary.rows_quarantined}"
        )
    _write_run_summary(run_dir, summary)
    LOG.info("ingest %s: %s", snapshot_date, json.dumps(summary.as_dict()))
    return summary


def _write_run_summary(run_dir: str, summary: IngestSummary) -> None:
    try:
        folder = local_path(run_dir)
    except ValueError:
        return  # remote home: the summary travels through XCom and the logs
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2, default=str))


