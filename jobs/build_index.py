"""Build, measure and publish the FAISS index of one model version of product_embeddings.

    reader    product_embeddings for the model version, at the table's current Delta version
              (recorded), streamed in batches; or, with ``shards=N``, N Spark tasks
    index     chosen from size, dimension, memory budget and latency target; trained on a sample,
              filled in batches, tuned to the recall target, measured (recall@10, p50/p99)
    writers   a new version folder under Settings.index_uri, verified, then CURRENT switched;
              retention; one row per build in index_versions; rejected rows in quarantine (stage ``index``)

A build whose recall misses the target is recorded as ``failed`` and not published (unless
``allow_below_target``): the previous version keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute

from moonpipe import delta
from moonpipe.settings import Settings
from schemas.tables import INDEX_VERSIONS, PRODUCT_EMBEDDINGS, QUARANTINE

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from moonpipe.vector_index.build import BuiltIndex
    from moonpipe.vector_index.sources import RejectedRow

LOG = logging.getLogger("moonpipe.jobs.build_index")
STAGE = "index"
DEFAULT_RETAIN = 3


class RecallBelowTarget(RuntimeError):
    """The tuned index does not reach the recall target; nothing was published."""


@dataclass
class IndexBuildSummary:
    index_version: str
    model_version: str
    source_table_version: int
    status: str = "failed"
    index_type: str = ""
    index_family: str = ""
    index_params: dict[str, int] = field(default_factory=dict)
    vector_count: int = 0
    dimension: int = 0
    rejected_rows: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None
    recall_target: float = 0.95
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_target_ms: float = 1.0  # reported against p50; a miss is logged, not fatal (load varies)
    memory_budget: str = ""
    estimated_bytes: int = 0
    index_bytes: int = 0
    index_uri: str = ""
    current: str | None = None
    retired: list[str] = field(default_factory=list)
    shards: int | None = None
    index_versions_version: int | None = None
    quarantine_version: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def resolve_model_version(settings: Settings, model_version: str | None) -> str:
    """The version asked for; else the configured MOON3.0 checkpoint's; else the only one in the table."""
    if model_version:
        return model_version
    from pathlib import Path

    from model.moon3_checkpoint import read_manifest

    if "://" not in settings.moon3_model and Path(settings.moon3_model).is_dir():
        return read_manifest(settings.moon3_model)["model_version"]  # a non-checkpoint folder fails, by name
    uri = settings.table_uri(PRODUCT_EMBEDDINGS.name)
    versions = sorted(set(delta.read_arrow(uri, columns=["model_version"]).column("model_version").to_pylist()))
    if len(versions) != 1:
        raise ValueError(f"which model version to index? product_embeddings holds {versions or 'none'}: "
                         "pass --model-version")
    return versions[0]


def _source_row(product_id: str, model_version: str) -> int:
    digest = hashlib.sha256(f"{model_version}\x00{product_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def quarantine_rejected(settings: Settings, rejected: list[RejectedRow], model_version: str, source_uri: str,
                        build_day: date) -> int | None:
    """MERGE the rows the index could not take into quarantine (stage ``index``): reruns update, never duplicate."""
    if not rejected:
        return None
    now = datetime.now(timezone.utc)
    rows = [{
        "stage": STAGE, "snapshot_date": r.snapshot_date or build_day, "source_uri": source_uri,
        "source_row": _source_row(r.product_id, model_version), "product_id": r.product_id,
        "reason_code": r.reason_code, "reason": r.reason,
        "raw_row": json.dumps({"product_id": r.product_id, "model_version": model_version}),
        "raw_image": None, "quarantined_at": now,
    } for r in rejected]
    table = pa.Table.from_pylist(rows, schema=QUARANTINE.arrow_schema())
    return delta.merge(table, settings.table_uri(QUARANTINE.name), QUARANTINE,
                       metadata={"moonpipe.job": "build_index", "moonpipe.model_version": model_version}).version


def _record(settings: Settings, summary: IndexBuildSummary, statuses: dict[str, str] | None = None) -> int:
    """Upsert this build's row (and retention's status changes) in index_versions."""
    uri = settings.table_uri(INDEX_VERSIONS.name)
    now = datetime.now(timezone.utc)
    row = {
        "index_version": summary.index_version, "model_version": summary.model_version,
        "source_table_version": summary.source_table_version, "index_type": summary.index_type or "-",
        "index_params": json.dumps(summary.index_params), "metric": "inner_product",
        "vector_count": summary.vector_count, "dimension": summary.dimension,
        "recall_at_10": summary.recall_at_10, "latency_p50_ms": summary.latency_p50_ms,
        "latency_p99_ms": summary.latency_p99_ms, "index_uri": summary.index_uri, "status": summary.status,
        "built_at": now, "recall_target": summary.recall_target, "memory_budget": summary.memory_budget,
        "index_bytes": summary.index_bytes, "rejected_rows": summary.rejected_rows,
        "build_seconds": summary.seconds.get("total"), "error": summary.error,
    }
    version = delta.merge(pa.Table.from_pylist([row], schema=INDEX_VERSIONS.arrow_schema()), uri, INDEX_VERSIONS,
                          metadata={"moonpipe.job": "build_index"}).version
    if statuses:
        keys = pa.Table.from_pylist([{"index_version": v, "status": s} for v, s in statuses.items()])
        existing = delta.read_arrow(uri)  # one row per build: small
        existing = existing.filter(pa.compute.is_in(existing.column("index_version"), pa.array(list(statuses))))
        if existing.num_rows:
            update = existing.drop_columns(["status"]).join(keys, "index_version").select(INDEX_VERSIONS.column_names)
            version = delta.merge(update.cast(INDEX_VERSIONS.arrow_schema()), uri, INDEX_VERSIONS,
                                  delta.MergeSpec(insert=False, update_set={"status": "s.status"}),
                                  metadata={"moonpipe.job": "build_index"}).version
    return version


def build_index(
    settings: Settings | None = None,
    spark: SparkSession | None = None,
    model_version: str | None = None,
    **options: Any,
) -> IndexBuildSummary:
    """Build and publish the index of ``model_version`` (default: the configured model's).

    Options: ``memory_budget`` ("2G"), ``latency_target_ms`` (1.0), ``recall_target`` (0.95), ``k``
    (10), ``queries`` (1000), ``batch_rows``, ``seed``, ``force_index`` (a FAISS factory string),
    ``retain`` (versions kept, 3), ``shards`` (build on that many Spark tasks), ``allow_below_target``
    (publish even if recall misses the target), ``fail_after_write`` (tests: crash before the switch).
    """
    from moonpipe.vector_index.build import BuildOptions, build_index_from_source
    from moonpipe.vector_index.sources import DeltaEmbeddings
    from moonpipe.vector_index.store import IndexStore, new_version_name

    settings = settings or Settings.from_env()
    retain = int(options.pop("retain", DEFAULT_RETAIN))
    shards = options.pop("shards", None)
    allow_below = bool(options.pop("allow_below_target", False))
    fail_after_write = bool(options.pop("fail_after_write", False))
    build_options = BuildOptions(**options)  # unknown options fail here, by name
    version = resolve_model_version(settings, model_version)
    source = DeltaEmbeddings(settings.table_uri(PRODUCT_EMBEDDINGS.name), version)
    store = IndexStore(settings.index_uri)
    summary = IndexBuildSummary(new_version_name(version), version, source.table_version,
                                recall_target=build_options.recall_target,
                                latency_target_ms=build_options.latency_target_ms,
                                memory_budget=str(build_options.memory_budget), shards=shards)
    started = time.perf_counter()
    try:
        if shards:
            from moonpipe.spark_session import get_spark
            from moonpipe.vector_index.sharded import build_sharded

            built = build_sharded(spark or get_spark(), source, build_options, int(shards), settings.index_uri)
        else:
            built = build_index_from_source(source, build_options)
        _describe(summary, built)
        summary.quarantine_version = quarantine_rejected(
            settings, built.rejected, version, f"{source.table_uri}@v{source.table_version}",
            datetime.now(timezone.utc).date())
        if not built.recall_target_reached and not allow_below:
            raise RecallBelowTarget(
                f"{built.choice.factory} reached recall@{built.k} {built.recall_at_k} < target "
                f"{build_options.recall_target} with the best parameters tried ({built.params}). Raise "
                "--memory-budget (a less compressed index), lower --recall-target, or pass --allow-below-target."
            )
        if built.latency_p50_ms > build_options.latency_target_ms:
            LOG.warning("index %s: p50 %.3f ms is over the %.3f ms target (measured on a loaded host?)",
                        built.choice.factory, built.latency_p50_ms, build_options.latency_target_ms)
        clock = time.perf_counter()
        manifest = {
            "model_version": version, "source_table_uri": source.table_uri,
            "source_table_version": source.table_version, "index_type": built.choice.factory,
            "index_family": built.choice.family, "index_params": built.params, "metric": "inner_product",
            "vector_count": built.vector_count, "dimension": built.dimension, "k": built.k,
            "recall_at_10": built.recall_at_k, "recall_target": build_options.recall_target,
            "latency_p50_ms": built.latency_p50_ms, "latency_p99_ms": built.latency_p99_ms,
            "memory_budget": str(build_options.memory_budget), "estimated_bytes": built.choice.estimated_bytes,
            "rejected_rows": len(built.rejected), "build_seconds": built.seconds,
            "built_at": datetime.now(timezone.utc).isoformat(), "shards": shards,
        }
        summary.index_uri = store.write_version(summary.index_version, built.index, built.id_map, manifest)
        summary.index_bytes = store.manifest(summary.index_version)["files"]["index.faiss"]["bytes"]
        if fail_after_write:
            raise RuntimeError("injected failure after the version was written, before CURRENT was switched")
        store.set_current(summary.index_version)
        summary.status, summary.current = "published", summary.index_version
        summary.retired = store.apply_retention(retain)
        summary.seconds["publish"] = round(time.perf_counter() - clock, 3)
    except BaseException as error:
        summary.status, summary.error = "failed", f"{type(error).__name__}: {error}"[:2000]
        summary.current = store.current()
        summary.seconds["total"] = round(time.perf_counter() - started, 3)
        try:
            summary.index_versions_version = _record(settings, summary)
        finally:
            LOG.error("index build %s failed: %s", summary.index_version, summary.error)
        raise
    summary.seconds["total"] = round(time.perf_counter() - started, 3)
    summary.index_versions_version = _record(settings, summary, {v: "retired" for v in summary.retired})
    LOG.info("index build: %s", json.dumps(summary.as_dict()))
    return summary


def _describe(summary: IndexBuildSummary, built: BuiltIndex) -> None:
    summary.index_type, summary.index_family = built.choice.factory, built.choice.family
    summary.index_params, summary.vector_count, summary.dimension = built.params, built.vector_count, built.dimension
    summary.rejected_rows = len(built.rejected)
    summary.rejected_reasons = dict(Counter(r.reason_code for r in built.rejected))
    summary.recall_at_10, summary.latency_p50_ms, summary.latency_p99_ms = (
        built.recall_at_k, built.latency_p50_ms, built.latency_p99_ms)
    summary.estimated_bytes = built.choice.estimated_bytes
    summary.seconds.update(built.seconds)
