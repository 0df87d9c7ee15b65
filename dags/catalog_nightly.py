"""catalog_nightly: the day's catalog snapshot -> validated products -> MOON3.0 embeddings -> FAISS index.

    wait_for_snapshot  the exporter's `_SUCCESS` marker in MOONPIPE_SNAPSHOTS_URI/dt=DATE
    load_snapshot      raw rows into catalog_snapshots (the date's partition replaced)
    ingest             Great Expectations; bad rows to quarantine; products MERGEd (deletions flagged)
    embed              new and changed products through MOON3.0 into product_embeddings
    build_index        FAISS index of the model version's vectors: chosen, tuned, measured, published
                       atomically as a new version (index_versions records it)

Runs one date after the other (depends_on_past, one active run), so a backfill of several dates
replays the catalog's history in order; every job is idempotent per date, so a rerun is a no-op on
the data. Params: `date` (default: the run's logical date), `model_dir` (default: the configured
production model), `full_reembed`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from moonpipe.orchestration import (
    DEFAULT_ARGS,
    RUN_DATE,
    index_asset,
    job_task,
    lake_asset,
    snapshot_sensor,
)

with DAG(
    dag_id="catalog_nightly",
    description="Nightly catalog snapshot -> products -> MOON3.0 embeddings",
    schedule="0 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "depends_on_past": True},
    dagrun_timeout=timedelta(hours=8),
    tags=["moonpipe", "catalog", "moon3", "embeddings"],
    params={
        "date": Param(None, type=["null", "string"], format="date", description="snapshot date (YYYY-MM-DD)"),
        "model_dir": Param(None, type=["null", "string"], description="MOON3.0 checkpoint directory"),
        "full_reembed": Param(False, type="boolean", description="re-embed every live product"),
    },
    doc_md=__doc__,
) as dag:
    wait = snapshot_sensor(timeout=timedelta(hours=6), poke_interval=timedelta(minutes=5))
    load = job_task(
        "load_snapshot",
        f"load-snapshot --date {RUN_DATE}",
        execution_timeout=timedelta(hours=1),
        outlets=[lake_asset("catalog_snapshots")],
    )
    ingest = job_task(
        "ingest",
        f"ingest --date {RUN_DATE}",
        execution_timeout=timedelta(hours=1),
        outlets=[lake_asset("products")],
    )
    embed = job_task(
        "embed",
        f"embed --date {RUN_DATE}"
        "{% if params.model_dir %} --model {{ params.model_dir }}{% endif %}"
        "{% if params.full_reembed %} --full{% endif %}",
        execution_timeout=timedelta(hours=4),
        outlets=[lake_asset("product_embeddings")],
    )
    index = job_task(
        "build_index",
        # The version the embed task just wrote, from its run summary.
        "index build --model-version {{ ti.xcom_pull(task_ids='embed')['model_version'] }}",
        execution_timeout=timedelta(hours=3),
        outlets=[index_asset(), lake_asset("index_versions")],
    )
    wait >> load >> ingest >> embed >> index
