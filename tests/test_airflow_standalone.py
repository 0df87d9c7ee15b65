"""The Asset link between the DAGs on a real Airflow: `airflow standalone` (scheduler, DAG processor,
triggerer, API server; SQLite metadata DB; LocalExecutor), started and stopped here on loopback.

catalog_nightly's own schedule fires (its latest 02:00 run, as on unpausing it in production) on a
tiny sample snapshot of that date; its `ingest` task updates the `moonpipe.products` Asset, and the
scheduler must then start `creative_scoring` (scheduled on that Asset) as an asset-triggered run.
`dag.test()` (tests/test_dags.py) records asset events but never triggers consumers: only the
scheduler does. The consumer's first task must render its command (an asset-triggered run has no
logical date, so no `ds`); it then fails for want of creative data, which is not checked here.

Everything lives in temporary folders: AIRFLOW_HOME (config, SQLite DB, logs, the generated admin
password), a DAGs folder with copies of the two DAG files, and a MOONPIPE_HOME with the snapshot, a
tiny MOON3.0 checkpoint and the lake. The API server listens on 127.0.0.1 only. (The two log servers
Airflow 3.3 starts beside the scheduler and triggerer bind every interface, hard-coded in
airflow.utils.serve_logs; they get free ports and answer only requests signed with this instance's
JWT secret, and live only as long as the test.)
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
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
DAG_FILES = ("catalog_nightly.py", "creative_scoring.py")
PRODUCER, CONSUMER = "catalog_nightly", "creative_scoring"
PRODUCTS_ASSET = "moonpipe.products"
FASHION = 5  # day 1: every Vendure product plus 5 Fashion-MNIST items

# Bounds for a loaded 2-core machine (measured there: healthy in ~45 s, the consumer triggered 40-75 s
# after unpausing, the whole file in ~90 s).
STARTUP_TIMEOUT = 240
TRIGGER_TIMEOUT = 360
RENDER_TIMEOUT = 180
STOP_TIMEOUT = 45
POLL = 3.0
# Tasks that must succeed before the products event exists; a failure of one ends the wait early.
UPSTREAM_OF_EVENT = ("wait_for_snapshot", "load_snapshot", "ingest")
GIVEN_UP = {"failed", "up_for_retry", "upstream_failed", "skipped", "removed"}

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> tuple[int, int, int, str, str] | None:
    """(ppid, pgid, sid, start time, state) of a live process, None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    state, ppid, pgid, sid = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    return ppid, pgid, sid, fields[19], state


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


@dataclass
class Standalone:
    """`airflow standalone` in a session (and process group) of its own, with every process it
    ever started remembered by (pid, start time), so that none can outlive the test unnoticed."""

    home: Path
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen | None = None
    seen: dict[int, str] = field(default_factory=dict)  # pid -> start time
    _token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "airflow", "standalone"],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the standalone log, without the API server's access lines (our own polling)."""
        if not self.log.exists():
            return ""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if "[http.access]" not in line]
        return "\n".join(lines)[-chars:]

    def _members(self) -> dict[int, str]:
        """Live processes of its session, its process group, or descended from one seen before."""
        leader = self.process.pid
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[4] != "Z":
                stats[int(entry.name)] = stat
        members = {pid: st[3] for pid, st in stats.items() if pid == leader or leader in (st[1], st[2])}
        grew = True
        while grew:  # children that left the session (setsid) are still descendants
            grew = False
            for pid, st in stats.items():
                if pid not in members and st[0] in members:
                    members[pid] = st[3]
                    grew = True
        return members

    def watch(self) -> None:
        self.seen.update(self._members())

    def alive(self) -> list[str]:
        """Processes it started that still run (pid reuse excluded by the start time)."""
        left = dict(self._members())
        for pid, started in self.seen.items():
            stat = _proc_stat(pid)
            if stat and stat[3] == started and stat[4] != "Z":
                left[pid] = started
        return [f"{pid} {_cmdline(pid)}" for pid in sorted(left)]

    def stop(self) -> list[str]:
        """SIGTERM to the group, then SIGKILL to whatever remains; returns what needed the SIGKILL."""
        if self.process is None:
            return []
        self.watch()
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            self.process.poll()
            if not self.alive():
                break
            time.sleep(0.5)
        stubborn = self.alive()
        for line in stubborn:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        return stubborn

    # -- the REST API (auth: the admin password `airflow standalone` generated) --------------------

    def _request(self, method: str, path: str, body: dict | None = None, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with _NO_PROXY.open(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def token(self) -> str:
        if self._token is None:
            users = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
            assert list(users) == ["admin"], users
            reply = self._request("POST", "/auth/token", {"username": "admin", "password": users["admin"]}, auth=False)
            self._token = reply["access_token"]
        return self._token

    def get(self, path: str):
        return self._request("GET", path)

    def patch(self, path: str, body: dict):
        return self._request("PATCH", path, body)

    def task_log(self, dag_id: str, run_id: str, task_id: str, chars: int = 3000) -> str:
        """The warnings and errors of a task's attempts (their logs are JSON lines), else their ends."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        out = []
        for path in sorted(folder.glob("*.log")):
            text, notes = path.read_text(errors="replace"), []
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("level") in ("warning", "error", "critical"):
                    details = [f"{d.get('exc_type')}: {d.get('exc_value')}" for d in record.get("error_detail") or []]
                    notes.append(" | ".join([str(record.get("event")), *details]))
            out.append(f"{path.name}:\n" + ("\n".join(notes) if notes else text)[-chars:])
        return "\n".join(out) or "(no task log)"


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _wait(what: str, airflow: Standalone, timeout: float, check, describe=lambda: ""):
    """Poll ``check()`` until it returns something truthy; a check may raise to give up early.
    ``describe()`` adds the state of things to the message of a timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if airflow.process.poll() is not None:
            pytest.fail(
                f"airflow standalone exited ({airflow.process.returncode}) while waiting for {what}:\n"
                f"{airflow.log_tail()}"
            )
        airflow.watch()
        try:
            if result := check():
                return result
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise
            last_error = error  # busy
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as error:
            last_error = error  # the API server is not up yet, or busy
        time.sleep(POLL)
    try:
        state = describe()
    except Exception as error:  # noqa: BLE001 (a message, not a check)
        state = f"(state unavailable: {error!r})"
    pytest.fail(
        f"no {what} within {timeout:.0f} s (last error: {last_error!r}) {state}\nstandalone log:\n{airflow.log_tail()}"
    )


def _child_env(airflow_home: Path, dags: Path, moonpipe_home: Path, ports: dict[str, int]) -> dict[str, str]:
    """This process's environment minus any Airflow, MoonPipe or proxy settings, plus the test's own."""
    drop = ("AIRFLOW_", "AIRFLOW__", "MOONPIPE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and "proxy" not in k.lower()}
    env.update(
        # `airflow standalone` starts its components as `airflow ...` from PATH: this venv's.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(ports["api"]),
        # Task processes reach the API server here (default: localhost:8080, maybe someone else's).
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{ports['api']}/execution/",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(ports["worker_logs"]),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(ports["trigger_logs"]),
        MOONPIPE_HOME=str(moonpipe_home),
        MOONPIPE_MOON3_MODEL=str(moonpipe_home / "models" / "moon3" / "v1"),
        MOONPIPE_EXECUTION_MODE="local",
        # Each task starts its own local Spark: small, no UI (no port 4040), on loopback (spark_session).
        MOONPIPE_SPARK_CONF="spark.master=local[2],spark.ui.enabled=false,spark.driver.memory=1g,"
        "spark.sql.shuffle.partitions=2",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("airflow-standalone")
    airflow_home, dags, moonpipe_home = root / "airflow", root / "dags", root / "moonpipe"
    for folder in (airflow_home, dags, moonpipe_home):
        folder.mkdir()
    for name in DAG_FILES:
        shutil.copy(DAGS_DIR / name, dags / name)
    ports = {"api": _free_port(), "worker_logs": _free_port(), "trigger_logs": _free_port()}
    assert len(set(ports.values())) == 3, ports
    env = _child_env(airflow_home, dags, moonpipe_home, ports)

    # The model the embed task loads after ingest (built while nothing else runs).
    from model.moon3_checkpoint import build_model, save_checkpoint
    from model.moon3_config import Moon3Config

    save_checkpoint(build_model(Moon3Config(seed=0)), env["MOONPIPE_MOON3_MODEL"])

    standalone = Standalone(home=airflow_home, env=env, port=ports["api"], log=root / "standalone.log")
    standalone.start()
    try:
        yield standalone
    finally:
        stubborn = standalone.stop()
        if stubborn:
            print(f"\nstill running {STOP_TIMEOUT} s after SIGTERM, killed: {stubborn}")
        left = standalone.alive()
        assert not left, f"processes of airflow standalone still running after SIGKILL: {left}"


def _healthy(airflow: Standalone):
    health = json.loads(_NO_PROXY.open(airflow.url + "/api/v2/monitor/health", timeout=30).read())
    if any(
        health.get(c, {}).get("status") != "healthy"
        for c in ("metadatabase", "scheduler", "dag_processor", "triggerer")
    ):
        return None
    if not (airflow.home / "simple_auth_manager_passwords.json.generated").exists():
        return None
    dags = {}
    for dag_id in (PRODUCER, CONSUMER):
        try:
            dags[dag_id] = airflow.get(f"/api/v2/dags/{dag_id}")
        except urllib.error.HTTPError as error:
            if error.code == 404:  # not parsed yet
                return None
            raise
    return dags


@dataclass
class Outcome:
    nightly_run: dict
    snapshot_date: date
    consumer_run: dict
    upstream_events: list[dict]
    products_events: list[dict]
    seconds_to_trigger: float
    moonpipe_home: Path


@pytest.fixture(scope="module")
def outcome(airflow) -> Outcome:
    dags = _wait(
        "healthy scheduler, DAG processor, triggerer and both DAGs parsed",
        airflow,
        STARTUP_TIMEOUT,
        lambda: _healthy(airflow),
    )
    assert dags[PRODUCER]["has_import_errors"] is False and dags[CONSUMER]["has_import_errors"] is False
    assert dags[PRODUCER]["is_paused"] and dags[CONSUMER]["is_paused"]  # new DAGs start paused
    assert airflow.get(f"/api/v2/dags/{CONSUMER}/dagRuns")["total_entries"] == 0

    # Unpaused, catalog_nightly (catchup=False) runs its latest 02:00 schedule at once: the
    # sample snapshot of that date (and the next, should the test straddle 02:00 UTC) is the day's export.
    next_run = dags[PRODUCER]["next_dagrun_logical_date"]
    assert next_run, dags[PRODUCER]
    snapshot_date = datetime.fromisoformat(next_run).date()
    from jobs.sample_catalog import build_sample_snapshots
    from moonpipe.settings import Settings

    settings = Settings.from_env(airflow.env["MOONPIPE_HOME"])
    build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, snapshot_date, days=2, fashion_items=FASHION)

    for dag_id in (CONSUMER, PRODUCER):
        assert airflow.patch(f"/api/v2/dags/{dag_id}", {"is_paused": False})["is_paused"] is False
    unpaused = time.monotonic()

    def nightly_state():
        runs = airflow.get(f"/api/v2/dags/{PRODUCER}/dagRuns")["dag_runs"]
        for run in runs:
            tis = airflow.get(f"/api/v2/dags/{PRODUCER}/dagRuns/{_q(run['dag_run_id'])}/taskInstances")
            for ti in tis["task_instances"]:
                if ti["task_id"] in UPSTREAM_OF_EVENT and ti["state"] in GIVEN_UP:
                    pytest.fail(
                        f"{PRODUCER} {run['dag_run_id']}: {ti['task_id']} is {ti['state']} before the "
                        f"products event:\n{airflow.task_log(PRODUCER, run['dag_run_id'], ti['task_id'])}"
                    )
        return runs

    def consumer_run():
        nightly_state()
        runs = airflow.get(f"/api/v2/dags/{CONSUMER}/dagRuns")["dag_runs"]
        # Started runs only: Airflow's upstreamAssetEvents endpoint answers 500 while the run it
        # created is still queued (its response model requires the run's start_date).
        return [r for r in runs if r["run_type"] == "asset_triggered" and r.get("start_date")]

    def producer_tasks():
        return {
            run["dag_run_id"]: {
                ti["task_id"]: ti["state"]
                for ti in airflow.get(f"/api/v2/dags/{PRODUCER}/dagRuns/{_q(run['dag_run_id'])}/taskInstances")[
                    "task_instances"
                ]
            }
            for run in airflow.get(f"/api/v2/dags/{PRODUCER}/dagRuns")["dag_runs"]
        }

    consumer_runs = _wait(
        f"asset-triggered {CONSUMER} run",
        airflow,
        TRIGGER_TIMEOUT,
        consumer_run,
        lambda: f"{PRODUCER}: {producer_tasks()}",
    )
    seconds = time.monotonic() - unpaused
    assert len(consumer_runs) == 1, consumer_runs
    run = consumer_runs[0]
    upstream = airflow.get(f"/api/v2/dags/{CONSUMER}/dagRuns/{_q(run['dag_run_id'])}/upstreamAssetEvents")
    events = airflow.get(f"/api/v2/assets/events?source_dag_id={PRODUCER}&source_task_id=ingest")
    # The producing run: the one the consumer's triggering event names (checked in the test).
    sources = {e["source_run_id"] for e in upstream["asset_events"]}
    nightly = [r for r in nightly_state() if r["dag_run_id"] in sources]
    assert len(nightly) == 1, (sources, nightly_state())
    return Outcome(
        nightly[0],
        snapshot_date,
        run,
        upstream["asset_events"],
        events["asset_events"],
        seconds,
        Path(airflow.env["MOONPIPE_HOME"]),
    )


def test_the_nightly_ingest_products_event_triggers_creative_scoring(outcome):
    nightly, run = outcome.nightly_run, outcome.consumer_run
    # The producer's run is the nightly schedule's own, on the snapshot built for its date.
    assert nightly["run_type"] == "scheduled"
    assert nightly["logical_date"].startswith(outcome.snapshot_date.isoformat())
    # The consumer's run was made by the scheduler, for an Asset update.
    assert run["run_type"] == "asset_triggered" and run["triggered_by"] == "asset"
    # ... by exactly one event: products, from catalog_nightly's ingest in that run.
    assert [
        (e["name"], e["source_dag_id"], e["source_task_id"], e["source_run_id"]) for e in outcome.upstream_events
    ] == [(PRODUCTS_ASSET, PRODUCER, "ingest", nightly["dag_run_id"])]
    event = outcome.upstream_events[0]
    assert event["uri"] == f"file://{(outcome.moonpipe_home / 'lake' / 'products').resolve()}"
    # The event, seen from the producer's side, records the run it created.
    (produced,) = [e for e in outcome.products_events if e["name"] == PRODUCTS_ASSET]
    assert produced["id"] == event["id"]
    assert [(r["dag_id"], r["run_id"]) for r in produced["created_dagruns"]] == [(CONSUMER, run["dag_run_id"])]
    print(f"\nasset-triggered {CONSUMER} run {outcome.seconds_to_trigger:.0f} s after unpausing")


def test_the_asset_triggered_run_renders_its_command(airflow, outcome):
    """No logical date in an asset-triggered run: the date defaults to the day it was triggered."""
    run = outcome.consumer_run
    path = f"/api/v2/dags/{CONSUMER}/dagRuns/{_q(run['dag_run_id'])}/taskInstances/score_creatives"

    def rendered():
        ti = airflow.get(path)
        if ti["rendered_fields"]:
            return ti
        if ti["state"] in GIVEN_UP:
            pytest.fail(
                f"score_creatives is {ti['state']} with nothing rendered:\n"
                f"{airflow.task_log(CONSUMER, run['dag_run_id'], 'score_creatives')}"
            )
        return None

    ti = _wait("rendered score_creatives command", airflow, RENDER_TIMEOUT, rendered)
    day = datetime.fromisoformat(run["run_after"]).date().isoformat()
    assert ti["rendered_fields"]["op_args"] == [f"score-creatives --date {day}"], ti["rendered_fields"]
