"""One Spark session and one temporary MOONPIPE_HOME for the whole test run."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before any project import reads the environment.
_HOME = Path(tempfile.mkdtemp(prefix="moonpipe-tests-"))
os.environ["MOONPIPE_HOME"] = str(_HOME)
os.environ.pop("MOONPIPE_LAKE_URI", None)
os.environ.pop("MOONPIPE_SNAPSHOTS_URI", None)
os.environ.pop("MOONPIPE_SPARK_CONF", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One Airflow metadata DB (SQLite) per run, configured before anything imports Airflow.
os.environ["AIRFLOW_HOME"] = str(_HOME / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ.pop("MOONPIPE_EXECUTION_MODE", None)

TEST_SPARK_CONF = {
    "spark.master": "local[2]",
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.memory": "2g",
}


@pytest.fixture(scope="session")
def spark():
    from moonpipe.spark_session import get_spark

    session = get_spark(profile="local", conf=TEST_SPARK_CONF, app_name="moonpipe-tests")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    # py4j's finalisers log at INFO when the interpreter exits, after pytest has closed the stream.
    logging.getLogger("py4j").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def settings():
    from moonpipe.settings import Settings

    return Settings.from_env()


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """The run's Airflow metadata database, migrated once (SQLite under the temporary home)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture()
def table_uri(tmp_path: Path) -> str:
    """A fresh location for one Delta table."""
    return str(tmp_path / "table")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)
