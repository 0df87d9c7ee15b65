"""Training throughput in model FLOP/s and as a fraction of the device's peak (MFU).

* A step's FLOPs are counted by torch's ``FlopCounterMode`` (matrix products, convolutions and
  attention, in the forward, the backward and any generation inside the step), once per step
  *kind* (the set of objective terms on at that step), the first time that kind runs. Later steps
  of the kind are charged the same count: their sequence lengths differ a little, their layers
  do not. Counting makes that one step slower (the counter sees every operator), which the run's
  time includes: a handful of steps in a run of thousands.
* The peak of one rank's device: the datasheet's dense figure for the precision on the GPUs
  listed below, else a square matrix product timed on the device in the run's dtype (a CPU's
  datasheet peak assumes every core, which a rank given ``threads`` does not have). The source is
  reported with the figure, since the two are not the same kind of ceiling.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Hashable, Iterator
from typing import Any

import torch

# Dense (no structured sparsity) peak FLOP/s per GPU, by a fragment of torch's device name; the
# first fragment that matches wins, so variants come before their family's name.
DATASHEET_PEAK_FLOPS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float32: 51.2e12}),
    ("H100 NVL", {torch.bfloat16: 835e12, torch.float32: 60e12}),
    ("H100", {torch.bfloat16: 989.4e12, torch.float32: 66.9e12}),  # SXM
    ("H200", {torch.bfloat16: 989.4e12, torch.float32: 66.9e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float32: 19.5e12}),
    ("A10", {torch.bfloat16: 125e12, torch.float32: 31.2e12}),
    ("L4", {torch.bfloat16: 121e12, torch.float32: 30.3e12}),
)


def _cpu_attention_formulas() -> dict[Any, Any]:
    """torch counts SDPA's CUDA kernels; its CPU kernel has the same arguments, so the same formulas
    (unwrapped: the counter wraps a custom formula in its shape adapter itself)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,
    }


class StepFlops:
    """FLOPs per step kind, counted the first time each kind runs (see the module's docstring)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.by_kind: dict[Hashable, int] = {}

    @contextlib.contextmanager
    def counting(self, kind: Hashable) -> Iterator[None]:
        """Wrap a step's forward and backward: counted when ``kind`` is new, else run as they are."""
        if not self.enabled or kind in self.by_kind:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
        with counter:
            yield
        self.by_kind[kind] = int(counter.get_total_flops())

    def of(self, kind: Hashable) -> int:
        return self.by_kind.get(kind, 0)


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in DATASHEET_PEAK_FLOPS:
        if fragment in name:
            return peaks.get(dtype)
    return None


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of the fastest of repeated [size x size] @ [size x size] products on ``device``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for attempt in range(1000):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        if attempt >= 2 and time.perf_counter() > deadline:  # the first products warm the kernels up
            break
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, source) of one rank's device: the datasheet where known, else measured."""
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        return sheet, f"datasheet ({torch.cuda.get_device_name(device)}, {str(dtype).removeprefix('torch.')}, dense)"
    return measured_matmul_peak(device, dtype), f"measured matmul ({device.type}, {str(dtype).removeprefix('torch.')})"


def throughput_summary(step_flops: StepFlops, train_flops: float, train_seconds: float, world: int,
                       device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A run's model FLOPs, FLOP/s per rank and its fraction of the rank's peak (JSON-able).
    ``train_flops`` is one rank's total (ranks run the same steps on batches of the same size)."""
    if not step_flops.enabled or not train_seconds:
        return {"counted": False}
    per_rank = train_flops / train_seconds
    peak, source = peak_flops(device, dtype)
    return {
        "counted": True,
        "flops_per_step_by_kind": {"+".join(map(str, kind)) if isinstance(kind, tuple) else str(kind): flops
                                   for kind, flops in step_flops.by_kind.items()},
        "train_flops": train_flops * world,
        "flops_per_second_per_rank": per_rank,
        "peak_flops_per_rank": peak,
        "peak_source": source,
        "fraction_of_peak": per_rank / peak,
    }
