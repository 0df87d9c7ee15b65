"""The batch predictor that jobs run on Spark workers.

``make_predict_fn`` is called ON THE WORKER (Spark's ``predict_batch_udf`` style): it builds or
loads the model there, once, and returns a function from a batch of products to vectors,
generated attributes and per-row errors. A product the model cannot process becomes that row's
error; the rest of the batch still gets its vectors.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.moon3_config import Moon3Config
from model.moon3_processing import Encoded, Moon3Processor, ProductInput, ProductRejected

LOG = logging.getLogger("moonpipe.model.predictor")


@dataclass
class Predictions:
    """Results in input order. Rows with an error have a zero vector and empty attributes."""

    vectors: np.ndarray  # [n, dim] float32, L2-normalised
    attributes: list[dict[str, str]]
    reasoning: list[str | None]
    error_codes: list[str | None]
    errors: list[str | None]
    model_version: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: preprocess, forward

    @property
    def ok(self) -> np.ndarray:
        return np.array([code is None for code in self.error_codes], dtype=bool)


def assigned_device() -> str:
    """The GPU Spark assigned to this task, else the first visible GPU, else the CPU."""
    import torch

    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        gpus = context.resources().get("gpu") if context is not None else None
        if gpus is not None and gpus.addresses:
            return f"cuda:{gpus.addresses[0]}"
    except ImportError:
        pass
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Group row indexes into batches whose padded size (rows x longest) stays within the budget.

    Rows are sorted by length first, so each batch holds similar lengths and padding is small.
    A row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and ((len(current) + 1) * longest > token_budget or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def make_predict_fn(
    model: str | Path | Moon3Config,
    *,
    device: str | None = None,
    dtype: str | None = None,
    reasoning: bool | None = None,
    token_budget: int | None = None,
    max_batch: int = 256,
    dim: int | None = None,
    threads: int | None = None,
    preprocess_workers: int = 1,
    compile_model: bool = False,
) -> Callable[[Sequence[ProductInput]], Predictions]:
    """Build the model here (a checkpoint directory, or a config for a fresh model) and return the
    predict function. bf16 on a GPU and float32 on the CPU unless ``dtype`` says otherwise.
    ``preprocess_workers`` > 1 decodes and resizes images in threads (PIL releases the GIL), which
    keeps a GPU fed when the task has several cores. ``compile_model`` compiles the decoder
    layers and vision blocks with torch.compile (fuses the norms, rotary and activation arithmetic
    around the matrix products; worth it on a GPU for long runs, costs a warm-up)."""
    import torch

    from model.moon3 import parse_attributes
    from model.moon3_checkpoint import build_model, load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    device = device or assigned_device()
    on_gpu = device.startswith("cuda")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype or ("bfloat16" if on_gpu else "float32")
    ]
    started = time.perf_counter()
    if isinstance(model, Moon3Config):
        net = build_model(model, dtype=torch_dtype, device=device)
        version = f"untrained-{model.backbone}-seed{model.seed}"
    else:
        net = load_checkpoint(model, dtype=torch_dtype)
        version = net.version
    net = net.to(device).eval()
    if compile_model:
        for block in [*net.backbone.model.language_model.layers, *net.backbone.model.visual.blocks]:
            block.compile(dynamic=True)
    processor = Moon3Processor(net.tokenizer, net.image_processor, net.config.prompt)
    budget = token_budget or (65536 if on_gpu else 8192)
    use_reasoning = net.config.reasoning if reasoning is None else reasoning
    out_dim = dim or net.config.embedding_dim
    LOG.info(
        "MOON3.0 %s on %s (%s), reasoning %s, built in %.1f s, pid %d",
        version, device, str(torch_dtype).removeprefix("torch."), "on" if use_reasoning else "off",
        time.perf_counter() - started, os.getpid(),
    )

    pool = ThreadPoolExecutor(preprocess_workers) if preprocess_workers > 1 else None

    def encode(product: ProductInput) -> Encoded | ProductRejected:
        try:
            return processor.encode(product)
        except ProductRejected as rejected:
            return rejected

    def run(items: list[Encoded]) -> tuple[torch.Tensor, list[str | None]]:
        batch = processor.collate(items)  # on the CPU: positions are cheap here, costly on a GPU
        batch["position_ids"] = net.rope_positions(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"))
        batch = {key: value.to(device) for key, value in batch.items() if value is not None}
        output = net(**batch, reasoning=use_reasoning, dim=dim)
        return output.embeddings, output.reasoning  # left on the device: no sync per batch

    def predict(products: Sequence[ProductInput]) -> Predictions:
        count = len(products)
        vectors = np.zeros((count, out_dim), dtype=np.float32)
        reasoning: list[str | None] = [None] * count
        codes: list[str | None] = [None] * count
        errors: list[str | None] = [None] * count
        clock = time.perf_counter()
        encoded: dict[int, Encoded] = {}
        for index, result in enumerate(pool.map(encode, products) if pool else map(encode, products)):
            if isinstance(result, ProductRejected):
                codes[index], errors[index] = result.code, str(result)
            else:
                encoded[index] = result
        preprocess = time.perf_counter() - clock
        clock = time.perf_counter()
        rows = sorted(encoded)
        done: list[tuple[list[int], torch.Tensor]] = []
        with torch.inference_mode():
            for batch in plan_batches([encoded[i].length for i in rows], budget, max_batch):
                indexes = [rows[i] for i in batch]
                try:
                    vecs, texts = run([encoded[i] for i in indexes])
                except (RuntimeError, ValueError) as error:
                    # Isolate the row at fault instead of failing the whole batch.
                    LOG.warning("batch of %d failed (%s); retrying its rows one by one", len(indexes), error)
                    for index in indexes:
                        try:
                            vec, text = run([encoded[index]])
                            done.append(([index], vec))
                            reasoning[index] = text[0]
                        except (RuntimeError, ValueError) as row_error:
                            codes[index], errors[index] = "model_error", f"model failed on this product: {row_error}"
                    continue
                done.append((indexes, vecs))
                for index, text in zip(indexes, texts):
                    reasoning[index] = text
            for indexes, vecs in done:
                vectors[indexes] = vecs.float().cpu().numpy()
        forward = time.perf_counter() - clock
        return Predictions(
            vectors=vectors,
            attributes=[parse_attributes(text) for text in reasoning],
            reasoning=reasoning,
            error_codes=codes,
            errors=errors,
            model_version=version,
            timings={"preprocess": preprocess, "forward": forward},
        )

    predict.model_version = version  # type: ignore[attr-defined]
    predict.model = net  # type: ignore[attr-defined]  # for benchmarks and diagnostics
    return predict


def products_from_arrow(batch: Any) -> list[ProductInput]:
    """ProductInputs from an Arrow batch/table with products-table columns (as a Spark UDF receives)."""
    return [ProductInput.from_row(row) for row in batch.to_pylist()]
