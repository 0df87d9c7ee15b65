"""A training step's inputs, built ahead by worker processes while the current step trains.

Every trainer draws step ``s``'s batch as a pure function of (seed, s, rank), so the inputs of
later steps can be built before they are needed: ``RunConfig.input_workers`` processes (a torch
``DataLoader`` indexed by step) decode photos, run the image processor and tokenize while the
model computes. With 0 workers the inputs are built in the training process, step by step.

Either way the loop sees the same inputs in the same order: a resumed run, or a run with another
number of workers, trains on exactly the batches it would have trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

BuildStep = Callable[[int], Any]


class _Steps(Dataset):
    def __init__(self, build: BuildStep, last_step: int) -> None:
        self.build = build
        self.last_step = last_step

    def __len__(self) -> int:
        return self.last_step

    def __getitem__(self, step: int) -> Any:
        return self.build(step)


def _as_built(inputs: Any) -> Any:
    return inputs  # the inputs are a whole step already: nothing to collate


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested dicts, lists and tuples moved to ``device``; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def step_inputs(build: BuildStep, first_step: int, last_step: int, workers: int,
                device: torch.device) -> Iterator[Any]:
    """``build(step)`` for steps ``first_step .. last_step - 1``, on ``device``, in step order.

    ``build`` must build on the CPU and depend on nothing but the step (workers run it in forked
    copies of this process, so state changed after the loader starts is not seen there)."""
    if workers == 0:
        for step in range(first_step, last_step):
            yield to_device(build(step), device)
        return
    loader = DataLoader(
        _Steps(build, last_step), batch_size=None, sampler=range(first_step, last_step), num_workers=workers,
        collate_fn=_as_built, pin_memory=device.type == "cuda", prefetch_factor=2,
        # fork: workers share the loaded training set instead of each unpickling a copy of it.
        multiprocessing_context="fork",
        # Its own generator: seeding the workers must not draw from torch's global one, which the
        # trainers sample from (GRPO), so that a run trains alike with any number of workers.
        generator=torch.Generator(),
    )
    for inputs in loader:
        yield to_device(inputs, device)
