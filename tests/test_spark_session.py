"""The Spark session factory and the cluster profiles in infra/spark/."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moonpipe.spark_session import load_profile, profile_path, resolve_conf, spark_submit_args

ROOT = Path(__file__).resolve().parent.parent
DISCOVERY = ROOT / "infra" / "spark" / "gpu_discovery.sh"


def test_local_session_runs_workers_on_this_interpreter(spark):
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.master") == "local[2]"
    assert conf.get("spark.sql.session.timeZone") == "UTC"
    assert conf.get("spark.python.worker.reuse") == "true"
    assert conf.get("spark.local.dir").endswith("/tmp/spark")
    assert os.environ["SPARK_LOCAL_IP"] == "127.0.0.1"
    worker_python = spark.sparkContext.parallelize([0], 1).map(lambda _: __import__("sys").executable).collect()
    assert worker_python == [sys.executable]  # the venv, not the system Python


def test_local_profile_defaults():
    conf = load_profile("local")
    assert conf["spark.master"] == "local[*]"
    assert conf["spark.sql.execution.arrow.pyspark.enabled"] == "true"


def test_kubernetes_profile_schedules_one_gpu_per_executor_and_task():
    conf = load_profile("k8s-gpu")
    assert conf["spark.master"].startswith("k8s://")
    assert conf["spark.executor.resource.gpu.amount"] == "1"
    assert conf["spark.task.resource.gpu.amount"] == "1"
    assert conf["spark.executor.resource.gpu.vendor"] == "nvidia.com"
    # The image installs the project at /opt/moonpipe: the script and template it names must exist here.
    for key in ("spark.executor.resource.gpu.discoveryScript", "spark.kubernetes.executor.podTemplateFile"):
        shipped = ROOT / Path(conf[key]).relative_to("/opt/moonpipe")
        assert shipped.is_file(), f"{key} points at {conf[key]}, but {shipped} is not in the repo"
    assert spark_submit_args("k8s-gpu") == ["--properties-file", str(ROOT / "infra" / "spark" / "k8s-gpu.conf")]


def test_overrides_apply_in_order(monkeypatch):
    monkeypatch.setenv("MOONPIPE_SPARK_CONF", "spark.sql.shuffle.partitions=3, spark.executor.memory=2g")
    conf = resolve_conf("local", {"spark.executor.memory": "1g"})
    assert conf["spark.sql.shuffle.partitions"] == "3"  # env over profile
    assert conf["spark.executor.memory"] == "1g"  # caller over env
    monkeypatch.setenv("MOONPIPE_SPARK_CONF", "spark.master")
    with pytest.raises(ValueError, match="MOONPIPE_SPARK_CONF item 'spark.master' is not key=value"):
        resolve_conf("local")


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match=r"Spark profile 'yarn' not found .*\['k8s-gpu', 'local', 'standalone'\]"):
        profile_path("yarn")


def _fake_nvidia_smi(folder: Path, output: str) -> None:
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '{output}'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def test_gpu_discovery_script_reports_gpus_in_spark_format(tmp_path):
    _fake_nvidia_smi(tmp_path, "0\\n1\\n")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run([str(DISCOVERY)], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": ["0", "1"]}


def test_gpu_discovery_script_fails_loudly_without_gpus(tmp_path):
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    missing = subprocess.run([str(DISCOVERY)], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "nvidia-smi not found" in missing.stderr
    _fake_nvidia_smi(tmp_path, "")
    empty = subprocess.run([str(DISCOVERY)], env=env, capture_output=True, text=True)
    assert empty.returncode == 1 and "lists no GPU" in empty.stderr
