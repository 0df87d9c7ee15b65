"""Model FLOP counting per step kind and the peak it is compared against (training/throughput.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.throughput import StepFlops, datasheet_peak, measured_matmul_peak, throughput_summary


def _linear_step(batch: int) -> None:
    layer = torch.nn.Linear(8, 4, bias=False)
    layer(torch.randn(batch, 8, requires_grad=True)).sum().backward()


def test_a_step_kind_is_counted_once_with_its_backward():
    flops = StepFlops()
    with flops.counting("nce"):
        _linear_step(batch=3)
    # forward x @ W^T, then the gradients of x and of W: three products of 2 x 3 x 8 x 4
    assert flops.of("nce") == 3 * 2 * 3 * 8 * 4
    with flops.counting("nce"):  # the kind is known: not counted again, whatever its shapes
        _linear_step(batch=30)
    assert flops.of("nce") == 576 and flops.of("grpo") == 0
    with flops.counting("grpo"):
        _linear_step(batch=1)
    assert flops.by_kind == {"nce": 576, "grpo": 192}


def test_attention_on_the_cpu_is_counted():
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    flops = StepFlops()
    with flops.counting("attention"):
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    # Each product of a 5x4 by a 4x5 (or 5x5 by 5x4) per head is 2 x 2 heads x 5 x 5 x 4 FLOPs:
    # the forward has two (scores, weighted values), the backward five (the scores recomputed,
    # the gradients of scores, values, queries and keys), as torch counts its fused kernels.
    product = 2 * 2 * 5 * 5 * 4
    assert flops.of("attention") == (2 + 5) * product


def test_a_disabled_counter_counts_nothing():
    flops = StepFlops(enabled=False)
    with flops.counting("nce"):
        _linear_step(batch=3)
    assert flops.of("nce") == 0
    assert throughput_summary(flops, 0.0, 10.0, 1, torch.device("cpu"), torch.float32) == {"counted": False}


def test_the_summary_divides_by_the_measured_peak_on_a_cpu():
    flops = StepFlops()
    with flops.counting(("sft", "grpo")):
        _linear_step(batch=3)
    summary = throughput_summary(flops, 1e9, 4.0, 2, torch.device("cpu"), torch.float32)
    assert datasheet_peak(torch.device("cpu"), torch.float32) is None
    assert summary["flops_per_step_by_kind"] == {"sft+grpo": 576}
    assert summary["train_flops"] == 2e9 and summary["flops_per_second_per_rank"] == 2.5e8
    assert summary["peak_source"] == "measured matmul (cpu, float32)"
    assert summary["fraction_of_peak"] == pytest.approx(2.5e8 / summary["peak_flops_per_rank"])
    # 2 cores of any machine that runs the suite: between 1 GFLOP/s and 10 TFLOP/s
    assert 1e9 < measured_matmul_peak(torch.device("cpu"), torch.float32, size=256, seconds=0.05) < 1e13
