"""The Creative4U judge that the scoring job runs on Spark workers.

``make_judge_fn`` is called ON THE WORKER: it loads the checkpoint there, once per Python worker,
on the GPU Spark assigned to the task (bf16) or the CPU (fp32), and returns a function from a
list of comparisons to judgments. An unreadable creative gives an undecided judgment with its
reason, never a failed batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from model.creative4u import Comparison, Judgment
from model.creative4u_config import Creative4UConfig

LOG = logging.getLogger("moonpipe.model.creative4u_predictor")


def make_judge_fn(
    model: str | Path | Creative4UConfig,
    *,
    device: str | None = None,
    dtype: str | None = None,
    decoding: str | None = None,
    max_batch: int = 16,
    threads: int | None = None,
) -> Callable[[Sequence[Comparison]], list[Judgment]]:
    """Build the model here (a checkpoint directory, or a config for an untrained one) and return
    ``judge(comparisons) -> judgments`` in input order. ``decoding`` overrides the checkpoint's."""
    import torch

    from model.creative4u_checkpoint import build_model, load_checkpoint
    from model.moon3_predictor import assigned_device

    if threads:
        torch.set_num_threads(threads)
    device = device or assigned_device()
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    ]
    started = time.perf_counter()
    net = build_model(model, dtype=torch_dtype) if isinstance(model, Creative4UConfig) else load_checkpoint(model, dtype=torch_dtype)
    net = net.to(device).eval()
    mode = decoding or net.config.decoding
    LOG.info(
        "Creative4U %s on %s (%s), %s decoding, built in %.1f s, pid %d",
        net.version, device, str(torch_dtype).removeprefix("torch."), mode, time.perf_counter() - started, os.getpid(),
    )

    def judge(comparisons: Sequence[Comparison]) -> list[Judgment]:
        return net.judge(comparisons, decoding=mode, max_batch=max_batch)

    judge.model_version = net.version  # type: ignore[attr-defined]
    judge.model = net  # type: ignore[attr-defined]
    judge.decoding = mode  # type: ignore[attr-defined]
    return judge
