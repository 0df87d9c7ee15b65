"""The main job on the embedded default: local Spark, a local Delta lake, the real sample data.

Builds the dated sample snapshots and, day by day, runs the nightly catalog pipeline: keep the raw
snapshot, ingest it (Great Expectations, quarantine, products MERGE), embed what is new or changed
with MOON3.0. Every step is idempotent, so running the demo again changes nothing.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from pathlib import Path

from moonpipe.progress import stage
from moonpipe.settings import Settings

LOG = logging.getLogger("moonpipe.demo")
SAMPLE_START_DATE = "2026-11-01"


def ensure_bootstrap_model(settings: Settings, preset: str = "tiny") -> str:
    """The MOON3.0 checkpoint the demo embeds with: an untrained one until training (a later issue)
    registers a better model."""
    from model.moon3_checkpoint import build_model, read_manifest, save_checkpoint
    from model.moon3_config import Moon3Config

    target = Path(settings.moon3_model)
    if not target.exists():
        version = save_checkpoint(build_model(Moon3Config(backbone=preset)), target)
        LOG.info("saved an untrained MOON3.0 (%s preset) as %s at %s", preset, version, target)
    return read_manifest(target)["model_version"]


def run_demo(days: int = 3, fashion_items: int = 300, settings: Settings | None = None) -> dict:
    from jobs.embed import embed
    from jobs.ingest import ingest
    from jobs.load_snapshot import load_snapshot
    from jobs.sample_catalog import build_sample_snapshots
    from moonpipe import delta
    from moonpipe.spark_session import get_spark

    settings = settings or Settings.from_env()
    start = date.fromisoformat(SAMPLE_START_DATE)
    with stage("build sample snapshots", LOG) as record:
        infos = build_sample_snapshots(
            out_uri=settings.snapshots_uri,
            raw_data_dir=settings.raw_data_dir,
            start_date=start,
            days=days,
            fashion_items=fashion_items,
        )
        record.rows = sum(i.rows for i in infos)
    with stage("MOON3.0 model", LOG):
        version = ensure_bootstrap_model(settings)
    with stage("start Spark", LOG):
        spark = get_spark()
    nights = []
    for offset in range(days):
        day = start + timedelta(days=offset)
        with stage(f"night of {day}", LOG):
            load_snapshot(day, settings, spark)
            nights.append((day, ingest(day, settings, spark), embed(day, settings.moon3_model, settings, spark)))

    print(f"\nMOON3.0 {version} over {days} nightly snapshots (lake: {settings.lake_uri})")
    print(f"{'date':12s} {'rows':>5s} {'valid':>5s} {'quar.':>5s} {'new':>4s} {'chg':>4s} {'del':>4s}"
          f" {'embedded':>8s} {'unchanged':>9s}  seconds")
    for day, ingested, embedded in nights:
        seconds = sum(ingested.seconds.values()) + sum(embedded.seconds.values())
        print(
            f"{day.isoformat():12s} {ingested.rows_in:5d} {ingested.rows_valid:5d} {ingested.rows_quarantined:5d} "
            f"{ingested.inserted:4d} {ingested.updated:4d} {ingested.deleted:4d} {embedded.embedded:8d} "
            f"{embedded.skipped_unchanged:9d}  {seconds:6.1f}"
        )
    print("\ntables:")
    for table in ("catalog_snapshots", "products", "quarantine", "product_embeddings"):
        uri = settings.table_uri(table)
        print(f"  {table:20s} v{delta.version(uri):<4d} {uri}")
    print(f"\nData Docs (Great Expectations) of the last night: {nights[-1][1].data_docs}")
    return {"model_version": version, "nights": [(d.isoformat(), i.as_dict(), e.as_dict()) for d, i, e in nights]}
