"""Embed the products that are new or changed for the current MOON3.0 version into product_embeddings.

    reader    live products whose (product_id, content_hash) has no embedding for this model version
              (all live products with ``full=True``, and necessarily when the version is new)
    model     MOON3.0's batch predictor in an Arrow UDF: built once per executor Python worker
              (never shipped from the driver), on the GPU Spark assigned to the task where there is one
    writers   product_embeddings: MERGE by (product_id, model_version); rows the model could not
              process: quarantine (stage ``embed``), with the reason

A conservation check fails the run if a product to embed is neither embedded nor quarantined.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from moonpipe import delta
from moonpipe.progress import stage
from moonpipe.settings import Settings
from schemas.tables import PRODUCT_EMBEDDINGS, PRODUCTS, QUARANTINE

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

LOG = logging.getLogger("moonpipe.jobs.embed")
STAGE = "embed"
MODEL_COLUMNS = ("product_id", "content_hash", "title", "description", "category_path", "attributes", "image_bytes")
UDF_OUTPUT = pa.schema(
    [
        ("source_row", pa.int64()),  # the quarantine row key of a product the model rejects
        ("product_id", pa.string()),
        ("content_hash", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("embedding_dim", pa.int32()),
        ("attributes", pa.map_(pa.string(), pa.string())),
        ("reasoning", pa.string()),
        ("error_code", pa.string()),
        ("error", pa.string()),
    ]
)

# Up to this many products to embed, their keys are broadcast to the executors (a few tens of MB)
# rather than joined by shuffling the catalog's images.
BROADCAST_TODO_LIMIT = 500_000
# Up to this many products to embed, the model's output is collected to the driver in the job that
# runs the model (at most ~60 MiB at 1536 dimensions) and merged from there: one Spark job, where a
# larger output is cached, counted and staged as Parquet files for the MERGE by further jobs.
DRIVER_MERGE_ROWS = 10_000

# One predictor per executor Python worker and model (Spark reuses workers between tasks).
_PREDICTORS: dict[tuple, Any] = {}


class ConservationError(RuntimeError):
    """A product to embed ended neither embedded nor quarantined."""


@dataclass
class EmbedSummary:
    snapshot_date: str
    model_version: str
    full: bool
    live_products: int = 0
    to_embed: int = 0
    embedded: int = 0
    quarantined: int = 0
    skipped_unchanged: int = 0
    removed_deleted: int = 0  # vectors of products the catalog deleted, taken out of the table
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    embeddings_version: int | None = None
    quarantine_version: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_version(model_dir: str) -> str:
    from model.moon3_checkpoint import read_manifest

    return read_manifest(model_dir)["model_version"]


def _predictor(model_dir: str, options: tuple[tuple[str, Any], ...]) -> Any:
    key = (model_dir, options)
    if key not in _PREDICTORS:
        from model.moon3_predictor import make_predict_fn

        _PREDICTORS[key] = make_predict_fn(model_dir, **dict(options))
    return _PREDICTORS[key]


def embed_batches(
    batches: Iterator[pa.RecordBatch], model_dir: str, options: tuple[tuple[str, Any], ...]
) -> Iterator[pa.RecordBatch]:
    """The Arrow UDF body: products in, vectors (or the reason there is none) out."""
    from model.moon3_predictor import products_from_arrow

    predict = _predictor(model_dir, options)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        result = predict(products_from_arrow(batch))
        ok = result.ok
        yield pa.RecordBatch.from_pydict(
            {
                "source_row": batch.column("source_row"),
                "product_id": batch.column("product_id"),
                "content_hash": batch.column("content_hash"),
                "embedding": pa.array(
                    [vector.tolist() if good else None for vector, good in zip(result.vectors, ok)],
                    pa.list_(pa.float32()),
                ),
                "embedding_dim": pa.array([result.vectors.shape[1] if good else None for good in ok], pa.int32()),
                "attributes": pa.array(
                    [list(a.items()) if good else None for a, good in zip(result.attributes, ok)],
                    pa.map_(pa.string(), pa.string()),
                ),
                "reasoning": pa.array(result.reasoning, pa.string()),
                "error_code": pa.array(result.error_codes, pa.string()),
                "error": pa.array(result.errors, pa.string()),
            },
            schema=UDF_OUTPUT,
        )


def products_to_embed(
    spark: "SparkSession", settings: Settings, version: str, full: bool
) -> tuple["DataFrame", "DataFrame"]:
    """(live, keys): the live products, and every product's narrow keys — (product_id, content_hash,
    is_deleted, needs_embedding, stale): ``needs_embedding`` when a live product has no embedding of
    its current content for ``version`` (every live product with ``full``), ``stale`` when a deleted
    product still has one.

    The comparison runs on the narrow keys alone; see ``needing_model`` for the wide rows."""
    from pyspark.sql import functions as F

    products = delta.read(spark, settings.table_uri(PRODUCTS.name))
    live = products.where(~F.col("is_deleted"))
    all_keys = products.select("product_id", "content_hash", "is_deleted")
    embeddings_uri = settings.table_uri(PRODUCT_EMBEDDINGS.name)
    if not delta.exists(embeddings_uri):
        return live, all_keys.select("*", (~F.col("is_deleted")).alias("needs_embedding"), F.lit(False).alias("stale"))
    # (product_id, model_version) is the table's key: at most one embedding per product here.
    done = (
        delta.read(spark, embeddings_uri)
        .where(F.col("model_version") == version)
        .select("product_id", F.col("content_hash").alias("embedded_hash"))
    )
    embedded = F.col("embedded_hash").isNotNull()
    current = embedded & (F.col("embedded_hash") == F.col("content_hash"))
    keys = all_keys.join(done, "product_id", "left").select(
        "product_id",
        "content_hash",
        "is_deleted",
        (~F.col("is_deleted") & (F.lit(full) | ~current)).alias("needs_embedding"),
        (F.col("is_deleted") & embedded).alias("stale"),
    )
    return live, keys


def needing_model(live: "DataFrame", keys: "DataFrame", to_embed: int, live_count: int) -> "DataFrame":
    """The live products (wide: images) whose keys need the model. A churn-sized list of keys is
    broadcast to the executors instead of shuffling every product's image for a sort-merge join."""
    from pyspark.sql import functions as F

    if to_embed == live_count:
        return live
    needed = keys.where("needs_embedding").select("product_id", "content_hash")
    if to_embed <= BROADCAST_TODO_LIMIT:
        needed = F.broadcast(needed)
    return live.join(needed, ["product_id", "content_hash"], "left_semi")


def embed(
    snapshot_date: date,
    model_dir: str,
    settings: Settings | None = None,
    spark: "SparkSession | None" = None,
    *,
    full: bool = False,
    reasoning: bool | None = None,
    device: str | None = None,
    threads_per_task: int | None = None,
) -> EmbedSummary:
    """Embed what changed since the last run for the model at ``model_dir`` (all with ``full``)."""
    from functools import partial

    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from moonpipe.spark_session import get_spark

    settings = settings or Settings.from_env()
    spark = spark or get_spark()
    version = model_version(model_dir)
    summary = EmbedSummary(snapshot_date.isoformat(), version, full)
    emb_uri = settings.table_uri(PRODUCT_EMBEDDINGS.name)
    threads = threads_per_task or int(spark.conf.get("spark.task.cpus", "1"))
    options = tuple(sorted({"reasoning": reasoning, "device": device, "threads": threads}.items()))

    clock = time.perf_counter()
    with stage(f"embed {snapshot_date}: select new and changed products", LOG) as record:
        live, keys = products_to_embed(spark, settings, version, full)
        # All counts in one narrow pass: a nightly run's cost should follow its churn, not the catalog.
        flags = {"live": ~F.col("is_deleted"), "needs_embedding": F.col("needs_embedding"), "stale": F.col("stale")}
        counts = keys.agg(*(F.sum(flag.cast("long")).alias(name) for name, flag in flags.items()))
        row = counts.first()
        summary.live_products, summary.to_embed = row["live"] or 0, row["needs_embedding"] or 0
        stale = row["stale"] or 0
        # source_row: the key of a quarantine row, should the model reject the product.
        todo = needing_model(live, keys, summary.to_embed, summary.live_products).select(
            *MODEL_COLUMNS, F.xxhash64("product_id").alias("source_row")
        )
        record.rows = summary.to_embed
        summary.skipped_unchanged = summary.live_products - summary.to_embed
    summary.seconds["select"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    with stage(f"embed {snapshot_date}: MOON3.0 {version}", LOG) as record:
        outputs: "pa.Table | DataFrame"
        if summary.to_embed == 0:  # nothing changed: no model, no scan of the wide columns
            outputs = UDF_OUTPUT.empty_table()
        else:
            partitions = max(1, min(spark.sparkContext.defaultParallelism, summary.to_embed))
            outputs = (
                todo.repartition(partitions)
                .mapInArrow(partial(embed_batches, model_dir=model_dir, options=options), from_arrow_schema(UDF_OUTPUT))
            )
            if summary.to_embed <= DRIVER_MERGE_ROWS:
                outputs = delta.collect_arrow(outputs)
            else:
                outputs = outputs.persist(StorageLevel.MEMORY_AND_DISK)
        record.rows = outputs.num_rows if isinstance(outputs, pa.Table) else outputs.count()
    summary.seconds["model"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    with stage(f"embed {snapshot_date}: write", LOG):
        failed = _failures(outputs)
        for _, code, _ in failed:
            summary.quarantine_reasons[code] = summary.quarantine_reasons.get(code, 0) + 1
        quarantined = _write_quarantine(spark, settings, todo, failed, snapshot_date)
        if quarantined is not None:
            summary.quarantined = quarantined.rows_written
            summary.quarantine_version = quarantined.version
        summary.embedded = summary.to_embed - len(failed)
        if summary.embedded:
            merged = delta.merge(
                _vectors(outputs, version, snapshot_date),
                emb_uri,
                PRODUCT_EMBEDDINGS,
                delta.MergeSpec(extra_predicate=f"t.model_version = '{version}'"),
                metadata={"moonpipe.job": "embed", "moonpipe.snapshot_date": snapshot_date.isoformat(),
                          "moonpipe.model_version": version},
            )
            summary.embedded = merged.inserted + merged.updated
            summary.embeddings_version = merged.version
        else:
            summary.embeddings_version = delta.ensure_table(emb_uri, PRODUCT_EMBEDDINGS).version()
        if stale:
            summary.removed_deleted, summary.embeddings_version = _remove_deleted_products(
                spark, settings, version, snapshot_date
            )
    summary.seconds["write"] = round(time.perf_counter() - clock, 2)
    if not isinstance(outputs, pa.Table):
        outputs.unpersist(blocking=True)  # free the cache now, not during the next run

    clock = time.perf_counter()
    check_conservation(spark, settings, version, snapshot_date, summary)
    summary.seconds["check"] = round(time.perf_counter() - clock, 2)
    LOG.info("embed %s: %s", snapshot_date, json.dumps(summary.as_dict()))
    return summary


def _failures(outputs: "pa.Table | DataFrame") -> list[tuple[int, str, str]]:
    """(source_row, error_code, error) of each product the model could not process."""
    columns = ["source_row", "error_code", "error"]
    if isinstance(outputs, pa.Table):
        rows = outputs.filter(pc.is_valid(outputs["error_code"])).select(columns).to_pylist()
        return [(r["source_row"], r["error_code"], r["error"]) for r in rows]
    return [tuple(r) for r in outputs.where("error_code IS NOT NULL").select(*columns).collect()]


def _vectors(outputs: "pa.Table | DataFrame", version: str, snapshot_date: date) -> "pa.Table | DataFrame":
    """product_embeddings rows for the products the model processed."""
    now = datetime.now(timezone.utc)
    constants = {"model_version": version, "snapshot_date": snapshot_date, "embedded_at": now}
    columns = [c.name for c in PRODUCT_EMBEDDINGS.columns]
    if isinstance(outputs, pa.Table):
        good = outputs.filter(pc.is_null(outputs["error_code"]))
        for name, value in constants.items():
            good = good.append_column(name, pa.array([value] * good.num_rows))
        return good.select(columns)
    from pyspark.sql import functions as F

    good = outputs.where(F.col("error_code").isNull())
    return good.select(*(F.lit(constants[c]).alias(c) if c in constants else F.col(c) for c in columns))


def _write_quarantine(
    spark: "SparkSession", settings: Settings, todo: "DataFrame", failed: list[tuple[int, str, str]], snapshot_date: date
) -> "delta.WriteResult | None":
    """Replace this date's embed quarantine with ``failed`` ((source_row, error_code, error) rows).

    Rows the model rejected are re-read from ``todo`` (keyed by its source_row) for their raw
    content. With nothing to quarantine and nothing there from an earlier run of the date, no
    commit is made at all."""
    from jobs.ingest import quarantine_frame

    uri = settings.table_uri(QUARANTINE.name)
    options = dict(
        mode="overwrite",
        replace_where={"stage": STAGE, "snapshot_date": snapshot_date},
        metadata={"moonpipe.job": "embed", "moonpipe.snapshot_date": snapshot_date.isoformat()},
    )
    if not failed:
        if not _has_partition(uri, snapshot_date):
            return None
        return delta.write(QUARANTINE.empty_arrow(), uri, QUARANTINE, **options)
    reasons = {key: [(code, error)] for key, code, error in failed}
    frame = quarantine_frame(
        spark, todo, reasons, stage_name=STAGE, snapshot_date=snapshot_date, source_uri=settings.table_uri(PRODUCTS.name)
    )
    return delta.write(frame, uri, QUARANTINE, **options)


def _has_partition(quarantine_uri: str, snapshot_date: date) -> bool:
    if not delta.exists(quarantine_uri):
        return False
    files = delta.file_actions(quarantine_uri)
    stages = files.column("partition.stage").to_pylist()
    dates = [str(d) for d in files.column("partition.snapshot_date").to_pylist()]
    return any(s == STAGE and d == snapshot_date.isoformat() for s, d in zip(stages, dates))


def _remove_deleted_products(
    spark: "SparkSession", settings: Settings, version: str, snapshot_date: date
) -> tuple[int, int]:
    """Delete this version's vectors of products the catalog has deleted, so search never serves
    them; the products themselves stay in ``products``, flagged. Returns (removed, table version)."""
    from pyspark.sql import functions as F

    emb_uri = settings.table_uri(PRODUCT_EMBEDDINGS.name)
    deleted = delta.read(spark, settings.table_uri(PRODUCTS.name)).where(F.col("is_deleted")).select("product_id")
    stale = (
        delta.read(spark, emb_uri)
        .where(F.col("model_version") == version)
        .join(deleted, "product_id", "left_semi")
    )
    result = delta.merge(
        stale,
        emb_uri,
        PRODUCT_EMBEDDINGS,
        delta.MergeSpec(update=False, insert=False, delete_matched_condition="true",
                        extra_predicate=f"t.model_version = '{version}'"),
        metadata={"moonpipe.job": "embed", "moonpipe.snapshot_date": snapshot_date.isoformat(),
                  "moonpipe.model_version": version},
    )
    return result.deleted, result.version


def check_conservation(
    spark: "SparkSession", settings: Settings, version: str, snapshot_date: date, summary: EmbedSummary
) -> None:
    """Every live product has an embedding of its current content for ``version`` or is quarantined
    by this run; and this run's counts add up."""
    from pyspark.sql import functions as F

    if summary.embedded + summary.quarantined != summary.to_embed:
        raise ConservationError(
            f"embed {snapshot_date}: {summary.to_embed} products to embed, but {summary.embedded} embedded + "
            f"{summary.quarantined} quarantined = {summary.embedded + summary.quarantined}"
        )
    _, keys = products_to_embed(spark, settings, version, full=False)
    missing = keys.where("needs_embedding").select("product_id")
    quarantine_uri = settings.table_uri(QUARANTINE.name)
    if _has_partition(quarantine_uri, snapshot_date):
        quarantined = (
            delta.read(spark, quarantine_uri)
            .where((F.col("stage") == STAGE) & (F.col("snapshot_date") == F.lit(snapshot_date)))
            .select("product_id")
        )
        missing = missing.join(quarantined, "product_id", "left_anti")
    lost = missing.limit(5).collect()
    if lost:
        raise ConservationError(
            f"embed {snapshot_date}: live products neither embedded for {version} nor quarantined, e.g. "
            f"{[r.product_id for r in lost]}: rerun `moonpipe embed --date {snapshot_date}`"
        )
