"""How the Airflow DAGs run the jobs: one code path, two execution modes.

Every DAG task runs a `moonpipe` command line (the same one a data engineer types). The mode is
configuration (``MOONPIPE_EXECUTION_MODE``), not a code fork:

    local    (default) the command runs in the Airflow worker's process on local Spark, through
             ``moonpipe.cli.run_command``; the embedded default and the test suite use it.
    cluster  the same command is handed to ``spark-submit`` by a SparkSubmitOperator with the
             Spark profile ``MOONPIPE_SPARK_PROFILE`` (infra/spark/<profile>.conf, e.g. k8s-gpu),
             over the Airflow connection ``MOONPIPE_SPARK_CONN_ID`` (default ``spark_default``).

Either way the task returns the job's run summary, which Airflow stores in XCom: in cluster mode
the driver writes it to ``--summary-out`` (under MOONPIPE_REPORTS, which must be storage the
Airflow worker can read: the driver runs there in client deploy mode) and the operator reads it back.

Imported by DAG files at parse time: only Airflow and the standard library at module level.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.sensors.python import PythonSensor
from airflow.sdk import Asset

from moonpipe.settings import Settings

MODES = ("local", "cluster")
CLI_SCRIPT = Path(__file__).with_name("cli.py")

# Task defaults every DAG shares (owners, retries); DAGs add their own timeouts per task.
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "data-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": True,
}

# The date a run works on: the `date` Param when given (backfills by hand), else the run's logical date.
# An asset-triggered run (creative_scoring after each ingest) has no logical date, hence no `ds`
# (a template reading it fails): it works on the day it was triggered (its run_after).
RUN_DATE = "{{ params.date or (ds if ds is defined else dag_run.run_after | ds) }}"


def execution_mode() -> str:
    mode = os.environ.get("MOONPIPE_EXECUTION_MODE", "local")
    if mode not in MODES:
        raise ValueError(f"MOONPIPE_EXECUTION_MODE={mode!r}: use one of {', '.join(MODES)}")
    return mode


def _asset_uri(location: str) -> str:
    return location if "://" in location else f"file://{Path(location).resolve()}"


def lake_asset(table: str) -> Asset:
    """The Airflow Asset of a lake table (its URI is the table's location)."""
    return Asset(name=f"moonpipe.{table}", uri=_asset_uri(Settings.from_env().table_uri(table)))


def index_asset() -> Asset:
    return Asset(name="moonpipe.vector_index", uri=_asset_uri(Settings.from_env().index_uri))


def reports_path(*parts: str) -> str:
    """A folder under MOONPIPE_REPORTS for a task's files (plots, evaluation reports)."""
    return "/".join([Settings.from_env().reports_dir, *parts])


def production_model_asset(kind: str) -> Asset:
    return Asset(name=f"moonpipe.production_model.{kind}", uri=_asset_uri(f"{Settings.from_env().models_dir}/{kind}"))


# -- local mode ------------------------------------------------------------------------------------


def run_in_process(command: str) -> dict | None:
    """Run a rendered `moonpipe` command line in this process; its run summary goes to XCom."""
    from moonpipe.cli import run_command

    return run_command(shlex.split(command))


# -- cluster mode ----------------------------------------------------------------------------------


class JobSubmitOperator(SparkSubmitOperator):
    """spark-submit of a `moonpipe` command; returns the run summary the driver wrote (for XCom)."""

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "command")

    def __init__(self, *, command: str, summary_dir: str, **kwargs: Any) -> None:
        # Kubernetes cluster deploy mode wants the driver image's copy: local:///opt/moonpipe/moonpipe/cli.py
        super().__init__(application=os.environ.get("MOONPIPE_SPARK_APPLICATION", str(CLI_SCRIPT)), **kwargs)
        self.command = command
        self.summary_dir = summary_dir

    def execute(self, context: Any) -> dict:
        run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", str(context["run_id"]))
        summary = Path(self.summary_dir) / self.dag_id / run_id / f"{self.task_id}.json"
        summary.unlink(missing_ok=True)  # a retry must not return the previous try's summary
        self.application_args = ["--summary-out", str(summary), *shlex.split(self.command)]
        super().execute(context)
        if not summary.exists():
            raise RuntimeError(
                f"{self.task_id}: spark-submit succeeded but wrote no run summary at {summary}; in cluster "
                "deploy mode MOONPIPE_REPORTS must be shared storage the Airflow worker can read"
            )
        return json.loads(summary.read_text())


# -- the task factories the DAG files use ---------------------------------------------------------


def job_task(
    task_id: str,
    command: str,
    *,
    execution_timeout: timedelta,
    outlets: Sequence[Asset] = (),
    doc: str = "",
    spark: bool = True,
    **operator_args: Any,
) -> Any:
    """A task that runs the `moonpipe` command line ``command`` (Jinja-templated) in the configured mode.

    ``spark=False`` marks a command that needs no Spark cluster (reports, DeepSpeed launches, the
    promotion gate): it runs in the Airflow worker's process in both modes."""
    common = dict(task_id=task_id, execution_timeout=execution_timeout, outlets=list(outlets), doc_md=doc)
    common.update(operator_args)
    if execution_mode() == "local" or not spark:
        return PythonOperator(python_callable=run_in_process, op_args=[command], **common)
    settings = Settings.from_env()
    from moonpipe.spark_session import profile_path

    return JobSubmitOperator(
        command=command,
        summary_dir=f"{settings.reports_dir}/runs",
        conn_id=os.environ.get("MOONPIPE_SPARK_CONN_ID", "spark_default"),
        properties_file=str(profile_path(settings.spark_profile)),
        name=f"moonpipe-{task_id}",
        **common,
    )


def _snapshot_ready(snapshot_date: str) -> bool:
    from datetime import date

    from jobs.load_snapshot import snapshot_ready

    return snapshot_ready(date.fromisoformat(snapshot_date))


def snapshot_sensor(task_id: str = "wait_for_snapshot", *, timeout: timedelta, poke_interval: timedelta) -> Any:
    """Waits for the day's snapshot ready marker; frees its worker slot between checks."""
    return PythonSensor(
        task_id=task_id,
        python_callable=_snapshot_ready,
        op_args=[RUN_DATE],
        mode="reschedule",
        timeout=timeout.total_seconds(),
        poke_interval=poke_interval.total_seconds(),
        execution_timeout=timeout,
        doc_md="Waits until the snapshot exporter has written the day's `_SUCCESS` marker.",
    )
