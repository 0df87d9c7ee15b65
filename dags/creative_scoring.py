"""creative_scoring: new and changed ad creatives -> Creative4U judgments -> scores and the report.

    score_creatives    every (product, user segment) group whose creatives or interests changed:
                       pairwise comparisons in both orders (Spark Arrow UDF), Bradley–Terry
                       scores and the selected creative into creative_judgments / creative_scores
    creative_report    the analysts' views (winners, score distributions, position-bias and
                       undecided rates) checked end to end; plot under MOONPIPE_REPORTS

Triggered by the `products` Asset that catalog_nightly's ingest updates. The creatives and
interactions tables are filled upstream (the sample data: `moonpipe creatives
build-data`). Idempotent per date; Params: `date`, `model_dir` (default: the configured production
Creative4U), `full_rescore`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from moonpipe.orchestration import DEFAULT_ARGS, RUN_DATE, job_task, lake_asset, reports_path

with DAG(
    dag_id="creative_scoring",
    description="Creative4U batch scoring of new creatives per user segment",
    # After each nightly ingest: product titles are part of what the judge reads, so a changed
    # catalog can change a group's inputs (unchanged groups are skipped by the job).
    schedule=[lake_asset("products")],
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    dagrun_timeout=timedelta(hours=8),
    tags=["moonpipe", "creatives", "creative4u"],
    params={
        "date": Param(None, type=["null", "string"], format="date", description="run date (YYYY-MM-DD)"),
        "model_dir": Param(None, type=["null", "string"], description="Creative4U checkpoint directory"),
        "full_rescore": Param(False, type="boolean", description="re-score every group, changed or not"),
    },
    doc_md=__doc__,
) as dag:
    score = job_task(
        "score_creatives",
        f"score-creatives --date {RUN_DATE}"
        "{% if params.model_dir %} --model {{ params.model_dir }}{% endif %}"
        "{% if params.full_rescore %} --full{% endif %}",
        execution_timeout=timedelta(hours=6),
        outlets=[lake_asset("creative_judgments"), lake_asset("creative_scores")],
    )
    report = job_task(
        "creative_report",
        f"creatives report --date {RUN_DATE} --png {reports_path('creatives')}/{RUN_DATE}.png",
        execution_timeout=timedelta(minutes=30),
        spark=False,
    )
    score >> report
