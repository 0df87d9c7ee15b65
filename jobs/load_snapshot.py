"""Load one dated catalog snapshot into the raw ``catalog_snapshots`` Delta table.

Reader (the ingest job's: Parquet or JSON Lines, contract checked) -> writer that replaces the
date's partition in one commit, so a rerun or a backfill of the same date leaves the same table.
Row-level validation (Great Expectations, quarantine) belongs to the ingest job that reads it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from moonpipe import delta
from moonpipe.progress import stage
from moonpipe.settings import Settings
from schemas.tables import CATALOG_SNAPSHOT, CATALOG_SNAPSHOTS

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOG = logging.getLogger("moonpipe.jobs.load_snapshot")
# Written by the exporter after the day's files (the Hadoop/Spark convention): a snapshot folder
# without it may still be being written, so the nightly DAG waits for it.
READY_MARKER = "_SUCCESS"


def snapshot_ready(snapshot_date: date, settings: Settings | None = None) -> bool:
    """True once the day's snapshot folder holds its ready marker (``_SUCCESS``)."""
    import pyarrow.fs as pafs

    from moonpipe.storage import resolve

    settings = settings or Settings.from_env()
    filesystem, root = resolve(f"{settings.snapshot_uri(snapshot_date.isoformat())}/{READY_MARKER}")
    return filesystem.get_file_info(root).type == pafs.FileType.File


@dataclass(frozen=True)
class LoadSummary:
    snapshot_date: str
    source_uri: str
    rows: int
    table_uri: str
    table_version: int
    files_written: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_snapshot(
    snapshot_date: date, settings: Settings | None = None, spark: "SparkSession | None" = None
) -> LoadSummary:
    """Replace ``snapshot_date``'s partition of catalog_snapshots with that day's snapshot."""
    from pyspark.sql import functions as F

    from jobs.ingest import read_snapshot
    from moonpipe.spark_session import get_spark

    settings = settings or Settings.from_env()
    spark = spark or get_spark()
    source_uri = settings.snapshot_uri(snapshot_date.isoformat())
    table_uri = settings.table_uri(CATALOG_SNAPSHOTS.name)
    started = time.perf_counter()
    with stage(f"load snapshot {snapshot_date}", LOG) as record:
        frame = read_snapshot(spark, source_uri).select(
            *CATALOG_SNAPSHOT.column_names,
            F.lit(snapshot_date).alias("snapshot_date"),
            F.lit(source_uri).alias("source_uri"),
            F.lit(datetime.now(timezone.utc)).alias("loaded_at"),
        )
        result = delta.write(
            frame,
            table_uri,
            CATALOG_SNAPSHOTS,
            mode="overwrite",
            replace_where={"snapshot_date": snapshot_date},
            metadata={"moonpipe.job": "load_snapshot", "moonpipe.snapshot_date": snapshot_date.isoformat()},
        )
        record.rows = result.rows_written
    return LoadSummary(
        snapshot_date=snapshot_date.isoformat(),
        source_uri=source_uri,
        rows=result.rows_written,
        table_uri=table_uri,
        table_version=result.version,
        files_written=result.files_added,
        seconds=round(time.perf_counter() - started, 2),
    )


@dataclass(frozen=True)
class SnapshotOverview:
    """What the raw table holds: rows per date and source, and day-over-day churn."""

    table_version: int
    per_date: list[dict[str, Any]]
    top_categories: list[dict[str, Any]]


def overview(spark: "SparkSession", settings: Settings | None = None) -> SnapshotOverview:
    """Rows, sources and churn (added / changed / deleted product ids) per snapshot date."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    settings = settings or Settings.from_env()
    table_uri = settings.table_uri(CATALOG_SNAPSHOTS.name)
    frame = delta.read(spark, table_uri)
    content = F.sha2(
        F.concat_ws(
            "\u0001",
            "title",
            "description",
            "category_path",
            "brand",
            F.to_json("attributes"),
            F.col("price").cast("string"),
            F.sha2(F.col("image_bytes"), 256),
        ),
        256,
    )
    rows = frame.select("snapshot_date", "product_id", "source", content.alias("content")).cache()
    dates = [r.snapshot_date for r in rows.select("snapshot_date").distinct().orderBy("snapshot_date").collect()]
    per_date = []
    for index, day in enumerate(dates):
        today = rows.where(F.col("snapshot_date") == day)
        counts = {r.source: r["count"] for r in today.groupBy("source").count().collect()}
        entry: dict[str, Any] = {"snapshot_date": day.isoformat(), "rows": sum(counts.values()), "by_source": counts}
        if index:
            before = rows.where(F.col("snapshot_date") == dates[index - 1])
            joined = today.alias("n").join(before.alias("o"), "product_id", "full_outer")
            entry["added"] = joined.where(F.col("o.content").isNull()).count()
            entry["deleted"] = joined.where(F.col("n.content").isNull()).count()
            entry["changed"] = joined.where(F.col("n.content") != F.col("o.content")).count()
        per_date.append(entry)
    rows.unpersist()
    latest = frame.where(F.col("snapshot_date") == dates[-1]) if dates else frame
    top = (
        latest.groupBy("category_path")
        .count()
        .withColumn("rank", F.row_number().over(Window.orderBy(F.desc("count"), "category_path")))
        .where("rank <= 8")
        .orderBy("rank")
        .collect()
    )
    return SnapshotOverview(
        table_version=delta.version(table_uri),
        per_date=per_date,
        top_categories=[{"category_path": r.category_path, "products": r["count"]} for r in top],
    )
