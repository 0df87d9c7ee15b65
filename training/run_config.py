"""What every training run shares, whatever the model: steps, batch, optimiser, DeepSpeed, checkpoints.

Model trainers nest a ``RunConfig`` in their own config dataclass (``Moon3TrainConfig.run``), so
the launcher, the DeepSpeed set-up and resumable checkpoints treat every model alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ZERO_CONFIGS = {"zero2": CONFIG_DIR / "zero2.json", "zero3": CONFIG_DIR / "zero3.json"}
PRECISIONS = ("auto", "fp32", "bf16")
ANNEAL_BY = ("steps", "time")


@dataclass(frozen=True)
class RunConfig:
    run_name: str = "run"  # folder under <models_dir>/<kind>/runs/ and the final checkpoint's name
    max_steps: int = 100
    time_budget_s: float | None = None  # stop (and save) once training has run this long
    micro_batch: int = 16  # per rank and step
    gradient_accumulation: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay down to this fraction of the learning rate
    # The cosine decays over max_steps ("steps"), or over time_budget_s when that ends first
    # ("time": a budget-bound run ends annealed on a slow machine too, at the cost of a
    # learning-rate curve that depends on the machine's speed).
    anneal_by: str = "steps"
    # "zero2" (default) or "zero3" (large backbones: parameters sharded too), or a JSON file path.
    zero: str = "zero2"
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (CPU bf16 is slower than fp32 here)
    checkpoint_every: int = 50  # resumable DeepSpeed checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the run folder's latest checkpoint when there is one
    seed: int = 0
    threads: int | None = None  # torch CPU threads per rank (None: torch's default)
    # Processes per rank that build the next steps' inputs while a step trains (0: built in the
    # training process); see training/step_inputs.py.
    input_workers: int = 0
    log_every: int = 10
    # Count each step kind's model FLOPs once (training/throughput.py): the run's summary then
    # gives its FLOP/s and their fraction of the device's peak.
    count_flops: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.micro_batch < 1 or self.gradient_accumulation < 1:
            raise ValueError("max_steps, micro_batch and gradient_accumulation must be >= 1")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0 and min_lr_ratio in [0, 1]")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {PRECISIONS}")
        if self.zero not in ZERO_CONFIGS and not Path(self.zero).is_file():
            raise ValueError(f"zero={self.zero!r} is neither {sorted(ZERO_CONFIGS)} nor an existing DeepSpeed JSON file")
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise ValueError(f"run_name={self.run_name!r} must be a plain folder name")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("time_budget_s must be > 0 when given")
        if self.keep_checkpoints < 1 or self.checkpoint_every < 0:
            raise ValueError("keep_checkpoints must be >= 1 and checkpoint_every >= 0")
        if self.anneal_by not in ANNEAL_BY:
            raise ValueError(f"anneal_by={self.anneal_by!r}: use one of {ANNEAL_BY}")
        if self.anneal_by == "time" and self.time_budget_s is None:
            raise ValueError("anneal_by='time' anneals over the time budget: set time_budget_s too")
        if self.input_workers < 0:
            raise ValueError(f"input_workers={self.input_workers} must be >= 0 (0: no worker processes)")


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A (possibly nested) frozen dataclass from a JSON-style dict; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        kind = known[name].type
        nested = _DATACLASSES.get(kind if isinstance(kind, str) else getattr(kind, "__name__", ""))
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


_DATACLASSES: dict[str, type] = {"RunConfig": RunConfig}


def register_config(cls: type) -> type:
    """Make a config dataclass nestable by name in ``from_dict`` (for the trainers' configs)."""
    _DATACLASSES[cls.__name__] = cls
    return cls
