"""The main job on the embedded default: the real Airflow DAGs over local Spark, a local Delta lake
and the real sample data.

    1. sample sources: dated catalog snapshots (with churn) and creatives with simulated traffic
    2. bootstrap models: untrained MOON3.0 and Creative4U checkpoints, until training promotes better ones
    3. `catalog_nightly` through Airflow (dag.test, SQLite metadata) on two consecutive dates:
       wait for the snapshot -> load -> ingest (GX) -> embed (MOON3.0) -> build and publish the index
    4. `creative_scoring` through Airflow on the last date
    5. where everything is, a similarity search for a real product, the winning creative per segment

Every step is idempotent: running the demo again changes no data.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from moonpipe.progress import stage
from moonpipe.settings import PROJECT_ROOT, Settings

LOG = logging.getLogger("moonpipe.demo")
SAMPLE_START_DATE = "2026-11-01"
LAKE_TABLES = (
    "catalog_snapshots", "products", "quarantine", "product_embeddings", "index_versions",
    "creatives", "user_segments", "interactions", "creative_judgments", "creative_scores",
)


def ensure_bootstrap_model(settings: Settings, preset: str = "tiny") -> str:
    """The MOON3.0 checkpoint the demo embeds with: an untrained one until training promotes a better one."""
    from model.moon3_checkpoint import build_model, read_manifest, save_checkpoint
    from model.moon3_config import Moon3Config

    target = Path(settings.moon3_model)
    if not target.exists():
        version = save_checkpoint(build_model(Moon3Config(backbone=preset)), target)
        LOG.info("saved an untrained MOON3.0 (%s preset) as %s at %s", preset, version, target)
    return read_manifest(target)["model_version"]


def ensure_bootstrap_creative_model(settings: Settings) -> str:
    """An untrained Creative4U; guided decoding keeps its output in the protocol's format."""
    from model.creative4u_checkpoint import build_model, read_manifest, save_checkpoint
    from model.creative4u_config import Creative4UConfig

    target = Path(settings.creative_model)
    if not target.exists():
        save_checkpoint(build_model(Creative4UConfig(decoding="guided")), target)
    return read_manifest(target)["model_version"]


def configure_airflow(settings: Settings) -> str:
    """Airflow on the embedded default: SQLite metadata under MOONPIPE_HOME, this project's dags/.
    Must run before anything imports Airflow (it reads its configuration once)."""
    os.environ.setdefault("AIRFLOW_HOME", f"{settings.home}/airflow")
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_ROOT / "dags"))
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")  # task logs: warnings up
    result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`airflow db migrate` failed in {os.environ['AIRFLOW_HOME']}:\n{result.stderr[-3000:]}")
    return os.environ["AIRFLOW_HOME"]


def load_dags() -> dict:
    """The project's DAGs, parsed once; a DAG file that fails to import stops the demo."""
    from airflow.models import DagBag

    bag = DagBag(str(PROJECT_ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.dags


def run_dag(dag, day: date, **conf) -> dict:
    """One real DAG run (dag.test: the tasks run in this process); its task states and summaries."""
    started = time.perf_counter()
    run = dag.test(logical_date=datetime(day.year, day.month, day.day, tzinfo=timezone.utc), run_conf=conf)
    instances = run.get_task_instances()
    states = {ti.task_id: str(ti.state) for ti in instances}
    if str(run.state) != "success":
        raise RuntimeError(f"{dag.dag_id} {day}: run {run.state}; tasks {states} (see the task logs above)")
    summaries = {ti.task_id: ti.xcom_pull(task_ids=ti.task_id) for ti in instances}
    return {"states": states, "summaries": summaries, "seconds": round(time.perf_counter() - started, 1)}


def _check_home_is_not_ahead(settings: Settings, start: date, last: date) -> None:
    """Fail at once, not after the DAG's retries, when the home already holds newer snapshots than
    the demo's (ingest refuses to roll products back)."""
    from jobs.ingest import ingested_snapshots

    newest = max(ingested_snapshots(settings), default=None)
    if newest and newest > last.isoformat():
        raise RuntimeError(
            f"{settings.home} already holds products up to snapshot {newest}, newer than the demo's "
            f"{start}..{last}, and the demo would roll them back: run it in a fresh home "
            f"(MOONPIPE_HOME=/path/to/new/home make demo) or remove {settings.home}"
        )


def run_demo(days: int = 2, fashion_items: int = 300, settings: Settings | None = None) -> dict:
    settings = settings or Settings.from_env()
    start = date.fromisoformat(SAMPLE_START_DATE)
    last = start + timedelta(days=days - 1)
    _check_home_is_not_ahead(settings, start, last)
    with stage("Airflow metadata DB (SQLite)", LOG):
        airflow_home = configure_airflow(settings)

    from jobs.creative_data import build_creative_data
    from jobs.sample_catalog import build_sample_snapshots
    from moonpipe.spark_session import get_spark

    with stage("sample catalog snapshots (Vendure + Fashion-MNIST, with churn)", LOG) as record:
        infos = build_sample_snapshots(
            settings.snapshots_uri, settings.raw_data_dir, start_date=start, days=days, fashion_items=fashion_items
        )
        record.rows = sum(i.rows for i in infos)
    with stage("bootstrap models", LOG):
        moon3_version = ensure_bootstrap_model(settings)
        creative_version = ensure_bootstrap_creative_model(settings)
    with stage("start Spark", LOG):
        spark = get_spark()
    with stage("sample creatives and simulated traffic", LOG):
        creative_data = build_creative_data(
            last, settings, spark, vendure_products=6, fashion_products=6, creatives_per_product=5
        )

    dags = load_dags()
    nights = []
    for offset in range(days):
        day = start + timedelta(days=offset)
        with stage(f"Airflow: catalog_nightly {day}", LOG):
            nights.append((day, run_dag(dags["catalog_nightly"], day)))
    with stage(f"Airflow: creative_scoring {last}", LOG):
        scoring = run_dag(dags["creative_scoring"], last)

    _print_report(settings, airflow_home, moon3_version, creative_version, nights, scoring, creative_data)
    return {
        "moon3_version": moon3_version,
        "creative_version": creative_version,
        "nights": [(d.isoformat(), r["summaries"]) for d, r in nights],
        "creative_scoring": scoring["summaries"],
    }


def _print_report(settings, airflow_home, moon3_version, creative_version, nights, scoring, creative_data) -> None:
    from moonpipe import delta

    print(f"\n== catalog_nightly (MOON3.0 {moon3_version}) ==")
    print(f"{'date':12s} {'rows':>5s} {'valid':>5s} {'quar.':>5s} {'new':>4s} {'chg':>4s} {'del':>4s}"
          f" {'embedded':>8s} {'unchanged':>9s} {'index':>22s} {'recall@10':>9s} {'p50 ms':>7s} {'run s':>6s}")
    for day, run in nights:
        ingested, embedded, index = (run["summaries"][t] for t in ("ingest", "embed", "build_index"))
        print(
            f"{day.isoformat():12s} {ingested['rows_in']:5d} {ingested['rows_valid']:5d} "
            f"{ingested['rows_quarantined']:5d} {ingested['inserted']:4d} {ingested['updated']:4d} "
            f"{ingested['deleted']:4d} {embedded['embedded']:8d} {embedded['skipped_unchanged']:9d} "
            f"{index['index_type'] + ' ' + index['index_version'][-8:]:>22s} {index['recall_at_10'] or 0:9.3f} "
            f"{index['latency_p50_ms'] or 0:7.3f} {run['seconds']:6.1f}"
        )
    scored = scoring["summaries"]["score_creatives"]
    print(f"\n== creative_scoring (Creative4U {creative_version}) ==")
    print(
        f"{creative_data.products} products x {creative_data.segments} segments, {creative_data.creatives} creatives, "
        f"{creative_data.creative_pairs} labelled CreativePairs from {creative_data.impressions:,} simulated "
        f"impressions; {scored['groups_scored']} groups scored with {scored['comparisons']} comparisons "
        f"(all pairs: {scored['all_pairs_comparisons']}), {scored['undecided']} undecided"
    )

    print(f"\n== where things are ==\nAirflow home (SQLite metadata, task logs): {airflow_home}")
    for table in LAKE_TABLES:
        uri = settings.table_uri(table)
        if delta.exists(uri):
            print(f"  {table:20s} v{delta.version(uri):<4d} {uri}")
    index = nights[-1][1]["summaries"]["build_index"]
    print(f"  FAISS index          {index['index_version']} (CURRENT) {index['index_uri']}")
    print(f"  Data Docs (GX)       {nights[-1][1]['summaries']['ingest']['data_docs']}")
    if scoring["summaries"].get("creative_report", {}).get("png"):
        print(f"  creative report      {scoring['summaries']['creative_report']['png']}")

    _print_similar_products(settings)
    _print_winning_creatives(settings)
    print("\nNote: both models are untrained bootstraps; `moonpipe train moon|creative` + `moonpipe promote` "
          "replace them (docs/training.md).")


def _print_similar_products(settings: Settings) -> None:
    from moonpipe import delta
    from moonpipe.vector_index.search import IndexSearcher

    searcher = IndexSearcher(settings)
    photos = delta.read_arrow(settings.table_uri("products"), columns=["product_id", "title", "is_deleted"])
    query = next(r for r in sorted(photos.to_pylist(), key=lambda r: r["product_id"])
                 if not r["is_deleted"] and not r["product_id"].startswith("FM-"))
    print(f"\n== similar products to {query['product_id']} ({query['title']}) ==")
    for hit in searcher.by_product_id(query["product_id"], k=5):
        print(f"  {hit.score:6.3f}  {hit.product_id:28s} {hit.title}")


def _print_winning_creatives(settings: Settings) -> None:
    from jobs.creative_views import query

    winners = query("SELECT product_id, segment_id, winner_creative_id, strength, reasoning FROM creative_winners "
                    "ORDER BY product_id, segment_id", settings).to_pylist()
    if not winners:
        print("\nno creative winners yet")
        return
    product = winners[0]["product_id"]
    print(f"\n== winning creative per segment for {product} ==")
    for row in (w for w in winners if w["product_id"] == product):
        # An untrained model's reasoning can hold any token, undecodable bytes included.
        reasoning = "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in (row["reasoning"] or ""))[:70]
        print(f"  {row['segment_id']:18s} {row['winner_creative_id']:34s} strength {row['strength']:6.2f}  {reasoning}")
