"""retraining: weekly — training sets from the lake -> DeepSpeed training -> evaluation -> promotion.

    export_training_sets   interactions + catalog -> MOON3.0 training sets (Spark; search logs
                           simulated where the sample data has none)
    train_<model>          DeepSpeed: one process locally, or every host of MOONPIPE_DEEPSPEED_HOSTFILE
    evaluate_<model>       the candidate vs the production model on held-out data (report + registry)
    promote_<model>        production changes only when the candidate wins by the configured margin;
                           a refusal is an outcome (the task succeeds and says so), not a failure

MOON3.0 and Creative4U train side by side. Params: `date`, `margin`, and lists of extra settings:
`export_args` (options of `moonpipe training-data export`), `moon3_overrides` / `creative4u_overrides`
(`key=value` trainer settings, e.g. `run.max_steps=200`), `evaluate_args` (options of `moonpipe evaluate`).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from moonpipe.orchestration import DEFAULT_ARGS, RUN_DATE, job_task, lake_asset, production_model_asset

# Multi-node DeepSpeed where the deployment provides a hostfile; one process otherwise.
HOSTFILE = os.environ.get("MOONPIPE_DEEPSPEED_HOSTFILE")
LAUNCH = f" --hostfile {HOSTFILE}" if HOSTFILE else ""

def _args(param: str, flag: str = "") -> str:
    """Jinja that appends each item of list Param ``param`` (after ``flag``, e.g. --set)."""
    return "{% for item in params." + param + " %} " + flag + "{{ item }}{% endfor %}"


with DAG(
    dag_id="retraining",
    description="Weekly retraining of MOON3.0 and Creative4U with DeepSpeed, evaluated and gated",
    schedule="0 3 * * 6",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retries": 1},
    dagrun_timeout=timedelta(hours=48),
    tags=["moonpipe", "training", "deepspeed", "moon3", "creative4u"],
    params={
        "date": Param(None, type=["null", "string"], format="date", description="export date (YYYY-MM-DD)"),
        "margin": Param(0.005, type="number", description="improvement over production required to promote"),
        "export_args": Param([], type="array", description="extra `training-data export` options"),
        "moon3_overrides": Param([], type="array", description="key=value MOON3.0 trainer settings"),
        "creative4u_overrides": Param([], type="array", description="key=value Creative4U trainer settings"),
        "evaluate_args": Param([], type="array", description="extra `evaluate` options, e.g. --query-limit 2000"),
    },
    doc_md=__doc__,
) as dag:
    export = job_task(
        "export_training_sets",
        f"training-data export --date {RUN_DATE}{_args('export_args')}",
        execution_timeout=timedelta(hours=2),
        outlets=[lake_asset("training_products"), lake_asset("moon3_query_pairs"), lake_asset("moon3_product_pairs")],
    )
    for kind, cli_kind in (("moon3", "moon"), ("creative4u", "creative")):
        train = job_task(
            f"train_{kind}",
            f"train {cli_kind} --set run.run_name={kind}-{{{{ run_id | replace(':', '-') | replace('+', '-') }}}}"
            f"{LAUNCH}{_args(kind + '_overrides', '--set ')}",
            execution_timeout=timedelta(hours=24),
            spark=False,
        )
        evaluate = job_task(
            f"evaluate_{kind}",
            f"evaluate --kind {kind} --candidate {{{{ ti.xcom_pull(task_ids='train_{kind}')['checkpoint_dir'] }}}}"
            + _args("evaluate_args"),
            execution_timeout=timedelta(hours=4),
            outlets=[lake_asset("model_registry")],
            spark=False,
        )
        promote = job_task(
            f"promote_{kind}",
            f"promote --kind {kind} --version {{{{ ti.xcom_pull(task_ids='train_{kind}')['model_version'] }}}} "
            "--margin {{ params.margin }} --allow-refusal",
            execution_timeout=timedelta(minutes=30),
            outlets=[production_model_asset(kind), lake_asset("model_registry")],
            spark=False,
        )
        export >> train >> evaluate >> promote
