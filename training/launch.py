"""The launcher: one process here, several ranks with torchrun, several nodes with a hostfile.

    train("moon3", config)                         one process, in this interpreter
    train("moon3", config, nproc=2)                2 ranks on this machine (torchrun; gloo on CPU)
    train("moon3", config, hostfile="hosts")       every node of the hostfile (the deepspeed launcher;
                                                   the repository and data at the same paths on each)

Every rank runs ``training.worker`` with the same config file; rank 0 writes ``summary.json`` in
the run folder (``<models_dir>/<kind>/runs/<run_name>``), which ``train`` returns. Trainers plug in
through ``TRAINERS``: a config class and a ``run(config, settings, run_dir)`` per model kind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moonpipe.settings import PROJECT_ROOT, Settings, local_path
from training.run_config import from_dict, to_dict

LOG = logging.getLogger("moonpipe.training.launch")


@dataclass(frozen=True)
class Trainer:
    config_class: str  # "module:Class"
    run: str  # "module:function(config, settings, run_dir) -> summary"


TRAINERS: dict[str, Trainer] = {
    "moon3": Trainer("training.moon3_trainer:Moon3TrainConfig", "training.moon3_trainer:run"),
    "creative4u": Trainer("training.creative4u_trainer:Creative4UTrainConfig", "training.creative4u_trainer:run"),
}


def _resolve(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer(model_kind: str) -> Trainer:
    if model_kind not in TRAINERS:
        raise ValueError(f"no trainer for model kind {model_kind!r}; known: {sorted(TRAINERS)}")
    return TRAINERS[model_kind]


def load_config(model_kind: str, config: Any) -> Any:
    """A trainer config from a config object, a dict or a JSON file path."""
    cls = _resolve(trainer(model_kind).config_class)
    if isinstance(config, cls):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        config = json.loads(path.read_text())
    if config is None:
        return cls()
    if not isinstance(config, dict):
        raise TypeError(f"config for {model_kind!r} must be a {cls.__name__}, a dict or a JSON path, not {type(config)}")
    return from_dict(cls, config)


def run_dir_for(model_kind: str, run_name: str, settings: Settings) -> Path:
    return local_path(settings.models_dir) / model_kind / "runs" / run_name


def train(
    model_kind: str,
    config: Any = None,
    *,
    nproc: int = 1,
    hostfile: str | None = None,
    settings: Settings | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train ``model_kind`` (``moon3``) with ``config``; returns the JSON-able run summary."""
    settings = settings or Settings.from_env()
    config = load_config(model_kind, config)
    run_dir = run_dir_for(model_kind, config.run.run_name, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    if nproc == 1 and hostfile is None:
        from training.engine import ensure_rendezvous

        ensure_rendezvous()
        return _resolve(trainer(model_kind).run)(config, settings, run_dir)
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    worker = ["-m", "training.worker", "--kind", model_kind, "--config", str(config_path),
              "--home", settings.home]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise FileNotFoundError(f"hostfile {hostfile} does not exist (lines of `host slots=N`)")
        command = [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", hostfile, "--module", *worker[1:]]
    else:
        from training.engine import free_port

        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", *worker]
    log_path = run_dir / "launch.log"
    LOG.info("launching %s ranks: %s (log: %s)", nproc if hostfile is None else "hostfile", " ".join(command), log_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    with log_path.open("w") as log:
        launcher = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = launcher.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_with_its_ranks(launcher)
            raise TimeoutError(f"training {model_kind!r} ran past its {timeout_s:.0f} s timeout and was stopped; "
                               f"last lines of {log_path}:\n{_tail(log_path)}") from None
    if returncode != 0 or not summary_path.is_file():
        raise RuntimeError(f"training {model_kind!r} failed (exit {returncode}); last lines of {log_path}:\n"
                           f"{_tail(log_path)}")
    return json.loads(summary_path.read_text())


def _tail(log_path: Path, lines: int = 30) -> str:
    return "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def _stop_with_its_ranks(launcher: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGUSR1 to the ranks (their stacks into the log), then SIGTERM to the launcher and every
    process under it (killing torchrun alone would leave its ranks running), SIGKILL to those still
    there after ``grace_s``."""
    import psutil

    try:
        processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    ranks = []
    for process in processes[1:]:
        with contextlib.suppress(psutil.Error):
            if "training.worker" in process.cmdline():
                ranks.append(process)
    for rank in ranks:  # each rank's stacks into the log first (training/worker.py): where it waited
        with contextlib.suppress(psutil.Error):
            rank.send_signal(signal.SIGUSR1)
    if ranks:
        time.sleep(2.0)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    launcher.wait()
