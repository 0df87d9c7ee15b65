"""A training rank (``training.worker``) whose config differs on rank 1 by ``--rank1 field=integer``.

``launch`` starts two such ranks with torchrun, so that their samples end at different lengths, as
a trained model's do: generation must still keep the ranks' collectives in step (ZeRO-3)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import training.launch
from moonpipe.settings import PROJECT_ROOT, Settings
from training.engine import free_port
from training.run_config import ZERO_CONFIGS, to_dict
from training.worker import main


def sharded_zero3(folder: Path) -> str:
    """ZeRO-3 sharding every parameter: the stock file keeps small ones whole on each rank,
    which is all of a tiny preset."""
    config = json.loads(ZERO_CONFIGS["zero3"].read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = folder / "zero3-sharded.json"
    path.write_text(json.dumps(config))
    return str(path)


def launch(kind: str, config: dict[str, Any], settings: Settings, rank1: str, timeout_s: float = 240) -> dict[str, Any]:
    """Two ranks of ``kind`` with ``rank1`` (``field=integer``) changed on rank 1; the run summary."""
    loaded = training.launch.load_config(kind, config)
    run_dir = training.launch.run_dir_for(kind, loaded.run.run_name, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(loaded)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               __file__, "--rank1", rank1, "--kind", kind, "--config", str(run_dir / "config.json"),
               "--home", settings.home]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


if __name__ == "__main__":
    field, _, value = sys.argv.pop(sys.argv.index("--rank1") + 1).partition("=")
    sys.argv.remove("--rank1")
    load_config = training.launch.load_config

    def load_config_of_this_rank(kind, config):
        loaded = load_config(kind, config)
        return dataclasses.replace(loaded, **{field: int(value)}) if os.environ["RANK"] == "1" else loaded

    training.launch.load_config = load_config_of_this_rank  # the worker imports it when it runs
    sys.exit(main())
