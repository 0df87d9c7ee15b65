"""Step inputs built ahead by worker processes: the same inputs, in step order, as building them inline."""

from __future__ import annotations

import pytest
import torch

from training.run_config import RunConfig
from training.step_inputs import step_inputs, to_device


def _build(step: int) -> tuple[int, dict]:
    generator = torch.Generator().manual_seed(step)
    return step, {"pixels": torch.rand(2, 3, generator=generator), "rows": [[step] * 2], "weights": {"sft": 0.5}}


@pytest.mark.parametrize("workers", [0, 2])
def test_inputs_arrive_in_step_order_and_match_inline_building(workers):
    built = list(step_inputs(_build, 3, 8, workers, torch.device("cpu")))
    assert [step for step, _ in built] == [3, 4, 5, 6, 7]
    for step, inputs in built:
        expected = _build(step)[1]
        assert torch.equal(inputs["pixels"], expected["pixels"])
        assert inputs["rows"] == [[step, step]] and inputs["weights"] == {"sft": 0.5}


def test_the_loader_leaves_torchs_global_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert len(list(step_inputs(_build, 0, 4, 1, torch.device("cpu")))) == 4
    assert torch.equal(torch.rand(3), expected)  # GRPO samples from this stream: it must not shift


def test_to_device_moves_nested_tensors_and_keeps_the_rest():
    value = {"a": torch.ones(1), "b": [torch.zeros(2), "text", (torch.ones(1), 3)], "c": None}
    moved = to_device(value, torch.device("cpu"))
    assert torch.equal(moved["a"], torch.ones(1)) and moved["b"][1] == "text" and moved["b"][2][1] == 3
    assert isinstance(moved["b"][2], tuple) and moved["c"] is None


def test_a_negative_worker_count_is_refused():
    with pytest.raises(ValueError, match="input_workers"):
        RunConfig(input_workers=-1)
