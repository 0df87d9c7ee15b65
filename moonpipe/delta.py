"""Delta Lake tables for every job, written from Spark without the Delta jars.

The reachable registries ship no Delta jars, so Spark cannot use the ``delta`` format here.
This module writes standard Delta tables with delta-rs (``deltalake``) instead:

* ``write``: each Spark partition writes its own Parquet files straight into the table folder
  (``mapInArrow``, on the executors) and returns their add actions; the driver then makes ONE
  commit for the whole job write: an append, a replace of some partitions, or a full overwrite.
* ``merge``: upsert by key. The source is staged as Parquet by the executors, then streamed into
  delta-rs' MERGE on the driver (retried when a concurrent writer wins the commit race).
* ``read``: Spark reads the current (or a past) snapshot's files; ``read_arrow`` does the same
  without Spark. ``compact``, ``vacuum`` and ``history`` wrap delta-rs.

Tables stay at protocol (reader 1, writer 2) with no deletion vectors or column mapping, so
delta-spark on a cluster reads, time-travels and appends to them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Field, WriterProperties
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, Transaction

from moonpipe import storage
from schemas.contract import ContractViolation, TableContract

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

STAGING_DIR = "_moonpipe_staging"  # Delta readers ignore folders starting with "_"
_MERGE_RETRIES = 8
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


@dataclass(frozen=True)
class WriteResult:
    table_uri: str
    version: int
    mode: str
    files_added: int
    rows_written: int
    skipped: bool = False  # True when the idempotency key showed the write was already committed


@dataclass(frozen=True)
class MergeResult:
    table_uri: str
    version: int
    source_rows: int
    inserted: int
    updated: int
    deleted: int
    unchanged: int
    attempts: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)


# -- table lifecycle ----------------------------------------------------------------------------


def open_table(uri: str, version: int | None = None, as_of: datetime | str | None = None) -> DeltaTable:
    """Open a Delta table, at its latest version unless a ``version`` or ``as_of`` time is given."""
    try:
        table = DeltaTable(uri)
    except TableNotFoundError:
        raise FileNotFoundError(
            f"no Delta table at {uri!r}: run the job that creates it first (see README, 'tables')"
        ) from None
    if version is not None:
        table.load_as_version(version)
    elif as_of is not None:
        table.load_as_version(as_of)
    return table


def exists(uri: str) -> bool:
    """Whether a Delta table is at ``uri``."""
    return DeltaTable.is_deltatable(uri)


def ensure_table(uri: str, contract: TableContract) -> DeltaTable:
    """Open the table at ``uri``, creating it empty from its contract if it does not exist yet.

    An existing table must still hold every contract column with the contract's type.
    """
    if exists(uri):
        table = DeltaTable(uri)
        contract.check_schema(table_arrow_schema(table))
        return table
    return DeltaTable.create(
        uri,
        schema=contract.arrow_schema(),
        mode="ignore",  # a concurrent creator may have won; theirs is the same contract
        partition_by=list(contract.partition_by) or None,
        name=contract.name,
        description=contract.doc[:500],
    )


def table_arrow_schema(table: DeltaTable) -> pa.Schema:
    return pa.schema(table.schema().to_arrow())


def _add_new_columns(table: DeltaTable, data_schema: pa.Schema) -> None:
    """Additive schema evolution: columns the data has and the table lacks are added (nullable)."""
    existing = set(table_arrow_schema(table).names)
    new_fields = [f.with_nullable(True) for f in data_schema if f.name not in existing]
    if new_fields:
        table.alter.add_columns([Field.from_arrow(f) for f in new_fields])
        table.update_incremental()


# -- writing files (runs on executors) ----------------------------------------------------------


def _partition_string(value: Any) -> str | None:
    """Delta's string form of a partition value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _partition_dir(partition_by: tuple[str, ...], values: Mapping[str, str | None]) -> str:
    """Hive-style folder ``col=value/...``, escaped as Spark and delta-rs do."""
    parts = []
    for col in partition_by:
        value = values[col]
        parts.append(f"{col}={_HIVE_NULL if value is None else quote(value, safe=' ')}")
    return "/".join(parts)


class _FileStats:
    """Delta add-action stats accumulated chunk by chunk (a file's data is never held in memory).

    Min/max are kept only where their JSON encoding is unambiguous (integers, dates, short
    strings); a missing bound only means delta-spark skips no file on that column.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.nulls: dict[str, int] = {}
        self.mins: dict[str, Any] = {}
        self.maxs: dict[str, Any] = {}
        self.unbounded: set[str] = set()

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for name in table.column_names:
            column = table.column(name)
            kind = column.type
            if pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
                continue
            self.nulls[name] = self.nulls.get(name, 0) + column.null_count
            bounded = pa.types.is_integer(kind) or pa.types.is_date(kind) or pa.types.is_string(kind)
            if not bounded or name in self.unbounded or column.null_count == len(column):
                continue
            low, high = (v.as_py() for v in pc.min_max(column).values())
            if isinstance(high, str) and len(high) > 32:
                # A truncated max would need rounding up to stay a true bound: keep none.
                self.unbounded.add(name)
                self.mins.pop(name, None)
                self.maxs.pop(name, None)
                continue
            self.mins[name] = low if name not in self.mins else min(self.mins[name], low)
            self.maxs[name] = high if name not in self.maxs else max(self.maxs[name], high)

    def to_json(self) -> str:
        encode = lambda values: {k: v.isoformat() if isinstance(v, date) else v for k, v in values.items()}  # noqa: E731
        return json.dumps(
            {"numRecords": self.rows, "minValues": encode(self.mins), "maxValues": encode(self.maxs), "nullCount": self.nulls}
        )


_FILE_RECORD = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("partition_values", pa.string()),
        ("modification_time", pa.int64()),
        ("num_records", pa.int64()),
        ("stats", pa.string()),
    ]
)


def write_files(
    batches: Iterator[pa.RecordBatch],
    table_uri: str,
    contract: TableContract,
    partition_by: tuple[str, ...],
    subdir: str = "",
) -> Iterator[pa.RecordBatch]:
    """Write ``batches`` as Parquet files under ``table_uri`` and yield one record per file.

    Rows are split by their partition values, one file per partition value set; partition
    columns are not stored in the files (the Delta convention). Every batch is checked against
    the contract before it is written.
    """
    filesystem, root = storage.resolve(table_uri)
    open_files: dict[tuple, tuple[pq.ParquetWriter, str, dict, _FileStats]] = {}
    task_id = uuid.uuid4().hex[:16]
    for batch in batches:
        if batch.num_rows == 0:
            continue
        for values, part in _split_by_partition(contract.conform(batch), partition_by):
            data = part.drop_columns(list(partition_by))
            key = tuple(values.get(c) for c in partition_by)
            if key not in open_files:
                folder = "/".join(p for p in (subdir, _partition_dir(partition_by, values)) if p)
                name = f"part-{len(open_files):05d}-{task_id}-c000.zstd.parquet"
                rel_path = f"{folder}/{name}" if folder else name
                filesystem.create_dir(f"{root}/{folder}" if folder else root, recursive=True)
                writer = pq.ParquetWriter(f"{root}/{rel_path}", data.schema, filesystem=filesystem, compression="zstd")
                open_files[key] = (writer, rel_path, values, _FileStats())
            writer, _, _, stats = open_files[key]
            writer.write_table(data, row_group_size=contract.row_group_rows)
            stats.add(data)
    for writer, rel_path, values, stats in open_files.values():
        writer.close()
        size = filesystem.get_file_info(f"{root}/{rel_path}").size
        record = {
            "path": rel_path,
            "size": size,
            "partition_values": json.dumps(values),
            "modification_time": int(time.time() * 1000),
            "num_records": stats.rows,
            "stats": stats.to_json(),
        }
        yield pa.RecordBatch.from_pylist([record], schema=_FILE_RECORD)


def _split_by_partition(
    table: pa.Table, partition_by: tuple[str, ...]
) -> list[tuple[dict[str, str | None], pa.Table]]:
    if not partition_by:
        return [({}, table)]
    keys = table.select(list(partition_by)).group_by(list(partition_by)).aggregate([]).to_pylist()
    groups = []
    for key in keys:
        mask = None
        for col, value in key.items():
            cond = pc.is_null(table.column(col)) if value is None else pc.equal(table.column(col), value)
            mask = cond if mask is None else pc.and_(mask, cond)
        groups.append(({c: _partition_string(v) for c, v in key.items()}, table.filter(mask)))
    return groups


# -- committing (driver) ------------------------------------------------------------------------


def _commit(
    table: DeltaTable,
    records: list[dict[str, Any]],
    contract: TableContract,
    mode: str,
    replace_where: Mapping[str, Any] | None,
    idempotency_key: tuple[str, int] | None,
    metadata: Mapping[str, Any] | None,
) -> int:
    actions = [
        AddAction(
            path=r["path"],
            size=r["size"],
            partition_values=json.loads(r["partition_values"]),
            modification_time=r["modification_time"],
            data_change=True,
            stats=r["stats"],
        )
        for r in records
    ]
    partition_filters = None
    metadata = {**(metadata or {}), "moonpipe.rows": sum(r["num_records"] for r in records)}
    if replace_where:
        unknown = set(replace_where) - set(contract.partition_by)
        if unknown:
            raise ValueError(
                f"table {contract.name!r}: replace_where may name only partition columns "
                f"{list(contract.partition_by)}, got {sorted(unknown)}"
            )
        partition_filters = [(col, "=", _partition_string(v)) for col, v in replace_where.items()]
        metadata["moonpipe.replace_where"] = {col: value for col, _, value in partition_filters}
        for r in records:  # a row outside the replaced partitions would survive the overwrite
            values = json.loads(r["partition_values"])
            for col, _, want in partition_filters:
                if values.get(col) != want:
                    raise ContractViolation(
                        f"table {contract.name!r}: replace_where {dict(replace_where)} but the data has "
                        f"rows with {col}={values.get(col)!r}. Filter the data to the replaced partition."
                    )
    properties = CommitProperties(
        custom_metadata={"moonpipe.contract": contract.name, **metadata},
        app_transactions=[Transaction(app_id=idempotency_key[0], version=idempotency_key[1])]
        if idempotency_key
        else None,
    )
    table.create_write_transaction(
        actions,
        mode,
        schema=table_arrow_schema(table),
        partition_by=list(contract.partition_by) or None,
        partition_filters=partition_filters,
        commit_properties=properties,
    )
    table.update_incremental()
    return table.version()


# -- public API: writes ---------------------------------------------------------------------------


def _check_mode(mode: str, replace_where: Mapping[str, Any] | None) -> str:
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be 'append' or 'overwrite', got {mode!r}")
    if replace_where and mode != "overwrite":
        raise ValueError("replace_where replaces partitions: use it with mode='overwrite'")
    return mode


def _already_committed(table: DeltaTable, idempotency_key: tuple[str, int] | None) -> bool:
    if idempotency_key is None:
        return False
    committed = table.transaction_version(idempotency_key[0])
    return committed is not None and committed >= idempotency_key[1]


def _spark_error_message(error: Exception) -> str | None:
    """The ContractViolation text inside a Spark task failure, if that is what failed."""
    text = str(error)
    marker = "ContractViolation: "
    if marker not in text:
        return None
    return text.split(marker, 1)[1].splitlines()[0]


def _write_spark_files(df: "DataFrame", table_uri: str, contract: TableContract, subdir: str) -> list[dict]:
    from pyspark.sql.pandas.types import from_arrow_schema

    contract.check_spark_schema(df.schema)  # fail on the driver, before any task runs
    partition_by = tuple(contract.partition_by) if not subdir else ()

    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from write_files(batches, table_uri, contract, partition_by, subdir)

    try:
        records = df.mapInArrow(write_partition, from_arrow_schema(_FILE_RECORD))
        return [row.asDict() for row in records.collect()]
    except Exception as error:
        message = _spark_error_message(error)
        if message:
            raise ContractViolation(message) from None
        raise


def write(
    data: "DataFrame | pa.Table",
    table_uri: str,
    contract: TableContract,
    *,
    mode: str = "append",
    replace_where: Mapping[str, Any] | None = None,
    idempotency_key: tuple[str, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> WriteResult:
    """Write a Spark DataFrame (or an Arrow table already on the driver) in ONE commit.

    With Spark, executors write the Parquet files and the driver commits them. ``mode="overwrite"``
    with ``replace_where={"snapshot_date": d}`` replaces just those partitions (the rerun-safe way
    to write a day); without it, the whole table. ``idempotency_key=(app_id, n)`` records the write
    in the Delta log and makes a repeated write with the same key a no-op.
    """
    _check_mode(mode, replace_where)
    table = ensure_table(table_uri, contract)
    if _already_committed(table, idempotency_key):
        return WriteResult(table_uri, table.version(), mode, 0, 0, skipped=True)
    if isinstance(data, pa.Table):
        _add_new_columns(table, data.schema)
        batches = write_files(iter(data.to_batches()), table_uri, contract, contract.partition_by)
        records = [record for batch in batches for record in batch.to_pylist()]
    else:
        _add_new_columns(table, _spark_arrow_schema(data))
        records = _write_spark_files(data, table_uri, contract, subdir="")
    if not records and mode == "append" and idempotency_key is None:
        return WriteResult(table_uri, table.version(), mode, 0, 0)  # nothing to add: no empty commit
    version = _commit(table, records, contract, mode, replace_where, idempotency_key, metadata)
    return WriteResult(table_uri, version, mode, len(records), sum(r["num_records"] for r in records))


def _writer_properties(contract: TableContract) -> WriterProperties | None:
    """delta-rs' Parquet settings for files it writes into the table (MERGE, compaction)."""
    return WriterProperties(max_row_group_size=contract.row_group_rows) if contract.row_group_rows else None


def _spark_arrow_schema(df: "DataFrame") -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(df.schema)


# -- public API: merge -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSpec:
    """What a MERGE does besides matching on the contract's key.

    ``update_condition``: SQL over ``s.`` (source) and ``t.`` (target) columns; matched rows are
    updated only where it holds (e.g. ``"s.content_hash <> t.content_hash"``); None updates all.
    ``update_set`` limits the update to some columns (e.g. to keep a first-seen date).
    ``insert``: insert unmatched source rows. ``delete_matched_condition``: delete matched target
    rows where it holds. ``not_matched_by_source_set`` / ``_condition``: update target rows that
    the source lacks (e.g. mark products deleted) instead of losing them.
    """

    update: bool = True  # update matched rows (False: a delete-only or insert-only MERGE)
    update_condition: str | None = None
    update_set: Mapping[str, str] | None = None  # explicit `target column -> SQL` updates; None = all columns
    insert: bool = True
    delete_matched_condition: str | None = None
    not_matched_by_source_set: Mapping[str, str] | None = None
    not_matched_by_source_condition: str | None = None
    extra_predicate: str | None = None  # ANDed to the key match, e.g. a partition filter for pruning


def collect_arrow(df: "DataFrame") -> pa.Table:
    """``df`` (known to be small) on the driver as Arrow, in the layout a Parquet reader gives,
    so that it, or a table derived from it, can be a MERGE source.

    delta-rs' MERGE panicked ("range start index ... out of range") on Spark's toArrow() output
    itself; an in-memory Parquet round trip gives it the columns it reads from staged files."""
    buffer = pa.BufferOutputStream()
    pq.write_table(df.toArrow(), buffer)
    return pq.read_table(pa.BufferReader(buffer.getvalue()))


def merge(
    source: "DataFrame | pa.Table",
    table_uri: str,
    contract: TableContract,
    spec: MergeSpec = MergeSpec(),
    *,
    metadata: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Upsert ``source`` into the table by the contract's key, in one commit.

    A Spark source is staged as Parquet inside the table folder by the executors and streamed
    into delta-rs' MERGE, so the driver never holds it whole (a source known to be small can be
    brought to the driver with ``collect_arrow`` instead: no staging job). A commit lost to a concurrent
    writer is retried on the new table version.
    """
    if not contract.key:
        raise ValueError(f"table {contract.name!r} has no key in its contract: MERGE needs one")
    table = ensure_table(table_uri, contract)
    filesystem, root = storage.resolve(table_uri)
    staging = None
    if isinstance(source, pa.Table):
        data = contract.conform(source)
        new_columns_schema = data.schema
        make_source: Callable[[], Any] = lambda: data  # noqa: E731
        source_rows = data.num_rows
    else:
        staging = f"{STAGING_DIR}/{uuid.uuid4().hex}"
        records = _write_spark_files(source, table_uri, contract, subdir=staging)
        files = [f"{root}/{r['path']}" for r in records]
        source_rows = sum(r["num_records"] for r in records)
        dataset = ds.dataset(files, format="parquet", filesystem=filesystem) if files else None
        new_columns_schema = dataset.schema if dataset else contract.arrow_schema()
        make_source = (lambda: dataset.scanner().to_reader()) if dataset else (lambda: contract.empty_arrow())
    try:
        _add_new_columns(table, new_columns_schema)
        predicate = " AND ".join(f"t.`{k}` = s.`{k}`" for k in contract.key)
        if spec.extra_predicate:
            predicate = f"{predicate} AND ({spec.extra_predicate})"
        for attempt in range(1, _MERGE_RETRIES + 1):
            merger = table.merge(
                make_source(),
                predicate=predicate,
                source_alias="s",
                target_alias="t",
                writer_properties=_writer_properties(contract),
                commit_properties=CommitProperties(custom_metadata={"moonpipe.contract": contract.name, **(metadata or {})}),
            )
            if spec.delete_matched_condition:
                merger = merger.when_matched_delete(predicate=spec.delete_matched_condition)
            if spec.update and spec.update_set:
                merger = merger.when_matched_update(updates=dict(spec.update_set), predicate=spec.update_condition)
            elif spec.update:
                merger = merger.when_matched_update_all(predicate=spec.update_condition)
            if spec.insert:
                merger = merger.when_not_matched_insert_all()
            if spec.not_matched_by_source_set:
                merger = merger.when_not_matched_by_source_update(
                    updates=dict(spec.not_matched_by_source_set), predicate=spec.not_matched_by_source_condition
                )
            try:
                metrics = merger.execute()
                break
            except CommitFailedError:
                if attempt == _MERGE_RETRIES:
                    raise
                time.sleep(0.05 * attempt)
                table.update_incremental()
        table.update_incremental()
    finally:
        if staging:
            filesystem.delete_dir_contents(f"{root}/{staging}", missing_dir_ok=True)
            filesystem.delete_dir(f"{root}/{staging}")
    inserted = int(metrics.get("num_target_rows_inserted", 0))
    updated = int(metrics.get("num_target_rows_updated", 0))
    deleted = int(metrics.get("num_target_rows_deleted", 0))
    return MergeResult(
        table_uri=table_uri,
        version=table.version(),
        source_rows=source_rows,
        inserted=inserted,
        updated=updated,
        deleted=deleted,
        unchanged=source_rows - inserted - updated - deleted,
        attempts=attempt,
        metrics=metrics,
    )


# -- public API: reads and maintenance -----------------------------------------------------------


def _check_file_readable(table: DeltaTable) -> None:
    """Reading Parquet files directly is exact only without deletion vectors or column mapping."""
    protocol = table.protocol()
    features = set(protocol.reader_features or [])
    if protocol.min_reader_version == 2 or {"deletionVectors", "columnMapping"} & features:
        raise ValueError(
            f"Delta table {table.table_uri!r} uses reader protocol {protocol.min_reader_version} {sorted(features)} "
            "that a file-level read cannot apply. Rewrite it without deletion vectors/column mapping "
            "(delta-spark: REORG TABLE ... APPLY (PURGE)) or read it with delta-spark."
        )


def read(
    spark: "SparkSession", table_uri: str, *, version: int | None = None, as_of: datetime | str | None = None
) -> "DataFrame":
    """The table's current snapshot (or the one at ``version`` / ``as_of``) as a Spark DataFrame."""
    from pyspark.sql.pandas.types import from_arrow_schema

    table = open_table(table_uri, version, as_of)
    _check_file_readable(table)
    arrow_schema = table_arrow_schema(table)
    schema = from_arrow_schema(arrow_schema)
    files = table.file_uris()
    if not files:
        return spark.createDataFrame([], schema)
    frame = spark.read.schema(schema).option("basePath", table_uri).parquet(*files)
    return frame.select(*arrow_schema.names)


def register_views(spark: "SparkSession", tables: Mapping[str, str]) -> list[str]:
    """Make each existing table queryable by name in Spark SQL (temporary views of the current
    snapshots); returns the names registered. Missing tables are skipped."""
    registered = []
    for name, uri in tables.items():
        if exists(uri):
            read(spark, uri).createOrReplaceTempView(name)
            registered.append(name)
    return registered


def read_arrow(
    table_uri: str,
    *,
    version: int | None = None,
    as_of: datetime | str | None = None,
    columns: list[str] | None = None,
    filters: Any = None,
) -> pa.Table:
    """The table's snapshot as an Arrow table on this process (small tables, tests, reports)."""
    table = open_table(table_uri, version, as_of)
    return table.to_pyarrow_table(columns=columns, filters=filters)


def file_actions(table_uri: str) -> pa.Table:
    """The current snapshot's data files: path, size, partition values, record counts, stats."""
    return pa.table(open_table(table_uri).get_add_actions(flatten=True))


def version(table_uri: str) -> int:
    return open_table(table_uri).version()


def history(table_uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Commits, newest first: version, timestamp, operation, parameters and metrics."""
    return open_table(table_uri).history(limit)


def compact(
    table_uri: str,
    contract: TableContract | None = None,
    *,
    target_size: int | None = None,
    partition: Mapping[str, Any] | None = None,
) -> dict:
    """Rewrite small files into larger ones (a data-neutral commit), with the contract's row group
    size when given; returns delta-rs' metrics."""
    filters = [(c, "=", _partition_string(v)) for c, v in partition.items()] if partition else None
    return open_table(table_uri).optimize.compact(
        partition_filters=filters, target_size=target_size,
        writer_properties=_writer_properties(contract) if contract else None,
    )


def vacuum(table_uri: str, *, retention_hours: int = 168, dry_run: bool = False) -> list[str]:
    """Delete files no longer referenced by versions within ``retention_hours`` (time travel past
    that is lost). Retention under the 7-day default is allowed because callers set it on purpose."""
    return open_table(table_uri).vacuum(
        retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False
    )

