"""The main job on the embedded default: local Spark, a local Delta lake, the real sample data.

Builds the dated sample snapshots, loads each day into Delta, and shows what the lake holds.
Every step is idempotent, so running the demo again reuses what is there.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta

from moonpipe.progress import stage
from moonpipe.settings import Settings

LOG = logging.getLogger("moonpipe.demo")
SAMPLE_START_DATE = "2026-11-01"


def run_demo(days: int = 3, fashion_items: int = 300, settings: Settings | None = None) -> dict:
    from jobs.load_snapshot import load_snapshot, overview
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
    with stage("start Spark", LOG):
        spark = get_spark()
    loads = [load_snapshot(start + timedelta(days=offset), settings, spark) for offset in range(days)]
    with stage("summarise the lake", LOG):
        summary = overview(spark, settings)

    table_uri = settings.table_uri("catalog_snapshots")
    print()
    print(f"catalog_snapshots  {table_uri}  (Delta version {summary.table_version})")
    print(f"{'date':12s} {'rows':>6s} {'added':>6s} {'changed':>8s} {'deleted':>8s}  by source")
    for day in summary.per_date:
        print(
            f"{day['snapshot_date']:12s} {day['rows']:6d} {day.get('added', '-'):>6} "
            f"{day.get('changed', '-'):>8} {day.get('deleted', '-'):>8}  {day['by_source']}"
        )
    print("\ntop categories on the latest day:")
    for category in summary.top_categories:
        print(f"  {category['products']:5d}  {category['category_path']}")
    print("\nlast commits:")
    for commit in delta.history(table_uri, limit=days):
        mode = commit.get("operationParameters", {}).get("mode", "")
        print(
            f"  v{commit['version']}  {commit['operation']} {mode:9s} {commit.get('moonpipe.rows', '?'):>5} rows"
            f"  replaced {commit.get('moonpipe.replace_where', 'nothing')}  by {commit.get('moonpipe.job', '?')}"
        )
    print(f"\nsnapshots: {settings.snapshots_uri}\nlake:      {settings.lake_uri}")
    return {"snapshots": [i.__dict__ for i in infos], "loads": [l.as_dict() for l in loads], "overview": summary.__dict__}
