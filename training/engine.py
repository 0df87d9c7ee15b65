"""DeepSpeed for every trainer: process group, engine, resumable checkpoints, gathered weights.

On CPU the process group uses gloo; on GPUs nccl. A single process without a launcher gets the
rendezvous variables set here (otherwise DeepSpeed looks for MPI). The optimiser is a torch
AdamW handed to DeepSpeed (a DeepSpeed-config optimiser would compile fused Adam first).

Resumable checkpoints are DeepSpeed's own (model, optimiser, scheduler and the trainer's step,
written by this project, read back only from the run folder); the models a run hands on are
written as safetensors by the model's checkpoint module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.run_config import ZERO_CONFIGS, RunConfig

LOG = logging.getLogger("moonpipe.training")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_rendezvous() -> None:
    """Single-process defaults for the variables torchrun/deepspeed set for each rank."""
    defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# DeepSpeed's backend JIT-compiles its shared-memory all-reduce op when the process group starts,
# though only inference uses it: tens of seconds and a compiler on a fresh machine, and a wait
# without end on the build's lock file when a killed process left one behind.
_OPS_TRAINING_NEVER_USES = ("deepspeed_shm_comm",)


def _skip_ops_training_never_uses() -> None:
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # what the backend consults before building an op
    for name in _OPS_TRAINING_NEVER_USES:
        compatible[name] = False


def init_distributed() -> None:
    if not torch.cuda.is_available():
        # Left to detect it, DeepSpeed warns on stdout that it chose the CPU, before the JSON
        # summary `moonpipe train` prints there.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    ensure_rendezvous()
    if not torch.distributed.is_initialized():
        _skip_ops_training_never_uses()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def generation_syncs_ranks(module: torch.nn.Module) -> bool:
    """Whether ``generate`` on ``module`` must step in lockstep on every rank (transformers'
    ``synced_gpus``). ZeRO-3 gathers sharded parameters from all ranks in each forward, so a rank
    whose samples end early has to keep stepping, or the other ranks' gathers fail or wait forever.
    Only ZeRO-3 marks parameters with ``ds_id``."""
    return world_size() > 1 and any(hasattr(p, "ds_id") for p in module.parameters())


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def reference_saved_before(step: int, warmup_steps: int, reference_dir: Path) -> bool:
    """Whether a run starting (or resuming) at ``step`` loads its GRPO reference from disk. Only past
    the warm-up: at the warm-up's last step every rank saves it (rank 0 writes, then a barrier) and
    loads it in the training loop. Loading whatever is on disk at that step let a rank starting late
    see the directory rank 0 had just written, skip the save's barrier and wait in its first
    all-reduce while rank 0 waited in the barrier."""
    return step > warmup_steps and reference_dir.exists()


def start_rank(run: RunConfig) -> tuple[torch.device, int, int]:
    """This process's part of a run: threads, the process group, its device, a per-rank seed.
    Returns (device, rank, world size)."""
    if run.threads:
        torch.set_num_threads(run.threads)
    init_distributed()
    torch.manual_seed(run.seed + rank())
    return device_for_rank(), rank(), world_size()


def use_bf16(run: RunConfig) -> bool:
    if run.precision == "auto":
        return torch.cuda.is_available()
    return run.precision == "bf16"


def deepspeed_config(run: RunConfig) -> dict[str, Any]:
    """The ZeRO data file plus what the run decides: batch sizes and precision."""
    path = ZERO_CONFIGS.get(run.zero, Path(run.zero))
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = run.micro_batch
    config["gradient_accumulation_steps"] = run.gradient_accumulation
    config["train_batch_size"] = run.micro_batch * run.gradient_accumulation * world_size()
    config["bf16"] = {"enabled": use_bf16(run)}
    config.setdefault("fp16", {"enabled": False})
    return config


class TrainingClock:
    """The seconds a run has trained, carried over resumes and the same on every rank.

    Ranks read the slowest rank's time (one all-reduce a step), so that the time budget stops them
    all after the same step and a schedule annealed over the budget gives them the same learning
    rate. Time spent writing checkpoints is left out by the trainers (``set`` after a save)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.seconds = 0.0
        self._before, self._started = 0.0, time.perf_counter()

    def set(self, seconds: float) -> None:
        """Count on from ``seconds`` (a resumed run's, or after a pause)."""
        self.seconds, self._before, self._started = seconds, seconds, time.perf_counter()

    def tick(self) -> float:
        """Read the clock (all ranks call it together, once a step)."""
        local = self._before + time.perf_counter() - self._started
        if world_size() > 1:
            slowest = torch.tensor([local], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
            local = float(slowest)
        self.seconds = local
        return local


def lr_lambda(run: RunConfig, clock: TrainingClock | None = None):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over ``max_steps``, or, with
    ``anneal_by="time"``, over the time budget when that runs out first (``clock``'s seconds):
    a run cut by its budget still ends annealed, whatever the machine's speed."""
    if run.anneal_by == "time" and clock is None:
        raise ValueError("anneal_by='time' needs the run's TrainingClock")

    def factor(step: int) -> float:
        if step < run.warmup_steps:
            return (step + 1) / run.warmup_steps
        progress = (step - run.warmup_steps) / max(1, run.max_steps - run.warmup_steps)
        if run.anneal_by == "time":
            progress = max(progress, clock.seconds / run.time_budget_s)
        progress = min(1.0, progress)
        return run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def initialize(module: torch.nn.Module, run: RunConfig, clock: TrainingClock | None = None) -> Any:
    """A DeepSpeed engine over ``module``'s trainable parameters (AdamW, warm-up + cosine; the
    run's ``clock`` drives a schedule annealed over the time budget)."""
    import deepspeed

    init_distributed()
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases, gates, temperature
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run.learning_rate,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run, clock))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(run)
    )
    return engine


@dataclass
class ResumeState:
    step: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    flops: float = 0.0  # model FLOPs of this rank's steps so far (training/throughput.py)
    extra: dict[str, Any] | None = None


def save_resumable(engine: Any, run_dir: Path, state: ResumeState, keep: int) -> Path:
    """DeepSpeed checkpoint ``step-NNNNNN`` of the run (all ranks call it); older ones pruned."""
    folder = run_dir / "checkpoints"
    tag = f"step-{state.step:06d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"moonpipe_state": state.__dict__})
    barrier()
    if rank() == 0:
        tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-keep]:
            shutil.rmtree(folder / old, ignore_errors=True)
    barrier()
    return folder / tag


def load_resumable(engine: Any, run_dir: Path) -> ResumeState | None:
    """The run's state from its latest DeepSpeed checkpoint, or None when it has none."""
    folder = run_dir / "checkpoints"
    if not (folder / "latest").is_file():
        return None
    path, client = engine.load_checkpoint(str(folder))
    if path is None or not client or "moonpipe_state" not in client:
        raise RuntimeError(
            f"resumable checkpoint in {folder} could not be loaded; delete the folder to start over, "
            f"or set resume=false"
        )
    LOG.info("resumed from %s", path)
    return ResumeState(**client["moonpipe_state"])


@contextlib.contextmanager
def gathered_parameters(engine: Any) -> Iterator[None]:
    """Full parameters on every rank for the duration (ZeRO-3 shards them; stages 0-2 keep them whole)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield
