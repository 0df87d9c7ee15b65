"""The embedding job on a real Spark standalone cluster on loopback: a master and two workers,
started and stopped here, give the same product_embeddings as local mode.

The suite's session (conftest.py, local[2]) runs the local half; the cluster half runs in a process
of its own (tests/spark_standalone_job.py), since a Python process holds one SparkSession. Both read
the same snapshot and the same tiny MOON3.0 checkpoint from this machine's disk, as workers sharing
the lake's storage would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jobs.embed import embed
from jobs.ingest import ingest
from jobs.sample_catalog import build_sample_snapshots
from model.moon3_checkpoint import build_model, save_checkpoint
from model.moon3_config import Moon3Config
from moonpipe import delta
from moonpipe.settings import Settings

pytestmark = pytest.mark.slow

D1 = date(2026, 11, 1)
FASHION = 20
PRODUCTS = 54 + FASHION  # every Vendure product plus the Fashion-MNIST items of day 1
APP_NAME = "moonpipe-standalone-test"
JOB_SCRIPT = Path(__file__).with_name("spark_standalone_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_groups() -> dict[int, list[tuple[int, str]]]:
    """Live (not zombie) processes by process group: {pgid: [(pid, command line)]}."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        state, _ppid, pgid = stat.rpartition(")")[2].split()[:3]
        if state != "Z":
            groups.setdefault(int(pgid), []).append((int(entry.name), cmdline[:200]))
    return groups


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class StandaloneCluster:
    """A Spark standalone master and workers on 127.0.0.1, run straight from pyspark's jars.

    Each daemon leads a process group of its own, which also holds what it starts (a worker's
    executors and their Python workers), so ``stop`` can end all of it and check that it did."""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g") -> None:
        import pyspark

        self.root = root
        self.workers, self.cores, self.memory = workers, cores, memory
        self.spark_home = Path(pyspark.__file__).parent
        self.port, self.webui_port = _free_port(), _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.daemons: list[Daemon] = []
        self.worker_dirs = [root / f"worker-{i}" for i in range(workers)]

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
        (self.root / "conf").mkdir(parents=True, exist_ok=True)
        env.update(
            SPARK_HOME=str(self.spark_home),
            SPARK_CONF_DIR=str(self.root / "conf"),  # empty: no stray spark-defaults or spark-env
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_DAEMON_MEMORY="512m",  # master and worker JVMs; executors are sized by the app
            **extra,
        )
        return env

    def _start(self, name: str, args: list[str], **env: str) -> None:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(self.spark_home / "bin" / "spark-class"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(**env),
                start_new_session=True,
            )
        self.daemons.append(Daemon(name, process, log))

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._start(
            "master",
            ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(self.port), "--webui-port", str(self.webui_port)],
        )
        for i, work_dir in enumerate(self.worker_dirs):
            scratch = work_dir / "local"
            scratch.mkdir(parents=True)
            self._start(
                f"worker-{i}",
                ["org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                 "--cores", str(self.cores), "--memory", self.memory, "--work-dir", str(work_dir),
                 "--webui-port", str(_free_port())],
                SPARK_LOCAL_DIRS=str(scratch),
            )

    def state(self) -> dict:
        """The master's JSON status: workers, active and completed applications."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/", timeout=5) as response:
            return json.load(response)

    def wait_for_workers(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for daemon in self.daemons:
                if daemon.process.poll() is not None:
                    raise RuntimeError(f"{daemon.name} exited with {daemon.process.returncode}:\n{daemon.log_tail()}")
            try:
                state = self.state()
                if sum(w["state"] == "ALIVE" for w in state["workers"]) == self.workers:
                    return state
            except OSError:  # the master's web UI is not up yet
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {d.name}\n{d.log_tail(1500)}" for d in self.daemons)
                raise TimeoutError(f"{self.workers} workers not registered with {self.url} in {timeout} s\n{logs}")
            time.sleep(1)

    def stop(self, grace: float = 20) -> list[tuple[int, str]]:
        """SIGTERM every daemon's group (workers first: they stop their executors), SIGKILL what is
        left after ``grace`` seconds; returns the processes still alive in those groups."""
        groups = [d.process.pid for d in reversed(self.daemons)]
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for daemon in self.daemons:
            try:
                daemon.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(g in _process_groups() for g in groups):
            time.sleep(0.5)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for daemon in self.daemons:
            try:
                daemon.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)  # let init reap the killed grandchildren
        live = _process_groups()
        return [proc for g in groups for proc in live.get(g, [])]


def _embeddings(settings: Settings) -> list[dict]:
    table = delta.read_arrow(
        settings.table_uri("product_embeddings"),
        columns=["product_id", "model_version", "content_hash", "embedding_dim", "embedding", "snapshot_date"],
    )
    return sorted(table.to_pylist(), key=lambda r: r["product_id"])


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory) -> SimpleNamespace:
    """The same date embedded in local mode and on a standalone cluster (stopped before the tests)."""
    root = tmp_path_factory.mktemp("standalone")
    local = Settings.from_env(home=root / "local-home")
    cluster_home = Settings.from_env(home=root / "cluster-home")
    build_sample_snapshots(local.snapshots_uri, local.raw_data_dir, D1, days=1, fashion_items=FASHION)
    shutil.copytree(local.snapshots_uri, cluster_home.snapshots_uri)
    model_dir = str(root / "moon3-tiny")
    save_checkpoint(build_model(Moon3Config(seed=0)), model_dir)

    cluster = StandaloneCluster(root / "cluster")
    report_path, job_log = root / "cluster-report.json", root / "cluster-job.log"
    job = None
    try:
        cluster.start()
        registered = cluster.wait_for_workers()
        conf = {
            "spark.master": cluster.url,
            "spark.app.name": APP_NAME,
            # Executors run the test's interpreter: the venv, where the project is installed.
            "spark.pyspark.python": sys.executable,
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.memory": "1g",
            "spark.local.dir": str(root / "driver-scratch"),
            "spark.ui.enabled": "false",
            # One 1-core executor per worker; the job waits until both have registered.
            "spark.cores.max": "2",
            "spark.executor.cores": "1",
            "spark.executor.memory": "1g",
            "spark.sql.shuffle.partitions": "2",
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
        env.update(MOONPIPE_HOME=cluster_home.home, SPARK_LOCAL_IP="127.0.0.1")
        with job_log.open("wb") as out:
            job = subprocess.Popen(
                [sys.executable, str(JOB_SCRIPT), "--date", D1.isoformat(), "--model", model_dir,
                 "--report", str(report_path), *(f"--conf={k}={v}" for k, v in conf.items())],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        # The local half runs meanwhile: the two are independent, and the wait is the longer one, not the sum.
        local_summaries = (ingest(D1, local, spark).as_dict(), embed(D1, model_dir, local, spark).as_dict())
        returncode = job.wait(timeout=300)
        assert returncode == 0, f"cluster job failed:\n{job_log.read_text(errors='replace')[-6000:]}"
        finished = cluster.state()
    finally:
        if job is not None and job.poll() is None:  # failed or timed out: end the driver and its JVM
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        survivors = cluster.stop()
    return SimpleNamespace(
        local=local,
        cluster_home=cluster_home,
        cluster=cluster,
        local_summaries=local_summaries,
        report=json.loads(report_path.read_text()),
        registered=registered,
        finished=finished,
        survivors=survivors + _process_groups().get(job.pid, []),
    )


def test_the_job_ran_on_both_workers_of_the_cluster(runs):
    report, cluster = runs.report, runs.cluster
    assert report["master"] == cluster.url
    assert report["default_parallelism"] == 2  # one core on each of the two workers
    # The driver's block manager and one executor's per worker, all on loopback.
    assert len(report["block_managers"]) == 3
    assert all(bm.startswith("127.0.0.1:") for bm in report["block_managers"])
    workers = runs.registered["workers"]
    assert len(workers) == 2 and {w["cores"] for w in workers} == {1} and {w["memory"] for w in workers} == {2048}
    apps = [a for a in runs.finished["completedapps"] if a["id"] == report["app_id"]]
    assert len(apps) == 1 and apps[0]["name"] == APP_NAME and apps[0]["state"] == "FINISHED"
    # Each worker launched an executor for the app, and each executor ran tasks.
    for work_dir in cluster.worker_dirs:
        executors = list((work_dir / report["app_id"]).iterdir())
        assert len(executors) == 1, (work_dir, executors)
        log = (executors[0] / "stderr").read_text(errors="replace")
        assert log.count("Finished task") > 0, log[-2000:]


def test_cluster_embeddings_equal_local_mode(runs):
    local_ingest, local_embed = runs.local_summaries
    cluster_ingest, cluster_embed = runs.report["ingest"], runs.report["embed"]
    counts = ("rows_in", "rows_valid", "rows_quarantined", "inserted", "updated", "deleted")
    assert [cluster_ingest[k] for k in counts] == [local_ingest[k] for k in counts] == [PRODUCTS, PRODUCTS, 0, PRODUCTS, 0, 0]
    counts = ("model_version", "live_products", "to_embed", "embedded", "quarantined", "skipped_unchanged")
    assert [cluster_embed[k] for k in counts] == [local_embed[k] for k in counts]
    assert (local_embed["embedded"], local_embed["quarantined"]) == (PRODUCTS, 0)

    local, cluster = _embeddings(runs.local), _embeddings(runs.cluster_home)
    assert len(local) == len(cluster) == PRODUCTS
    keys = ("product_id", "model_version", "content_hash", "embedding_dim", "snapshot_date")
    assert [tuple(r[k] for k in keys) for r in cluster] == [tuple(r[k] for k in keys) for r in local]
    local_vectors = np.array([r["embedding"] for r in local], dtype=np.float32)
    cluster_vectors = np.array([r["embedding"] for r in cluster], dtype=np.float32)
    assert local_vectors.shape == (PRODUCTS, 128)
    np.testing.assert_allclose(cluster_vectors, local_vectors, rtol=0, atol=1e-5)
    # Distinct products get distinct vectors: the comparison is not between constant outputs.
    assert len({tuple(np.round(v, 4)) for v in local_vectors}) == PRODUCTS


def test_stopping_the_cluster_leaves_no_process_and_frees_the_port(runs):
    assert runs.survivors == []
    for daemon in runs.cluster.daemons:
        assert daemon.process.returncode is not None, daemon.name
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", runs.cluster.port))
