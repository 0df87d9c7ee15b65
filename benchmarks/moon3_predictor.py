"""Throughput of the MOON3.0 batch predictor, measured side by side in one run.

For each backbone preset and reasoning off/on: products per second end to end, the share of time
spent preprocessing (image decode + resize + tokenisation) vs in the model, and, on a GPU, the
achieved fraction of the GPU's peak bf16 FLOP/s during the forward passes (FLOPs counted with
torch's FlopCounterMode on the same products, in a separate untimed pass).

    moonpipe bench moon3 --presets tiny,small --products 128          (what `make bench` runs)
    moonpipe bench moon3 --presets qwen2-vl-2b-shape --device cuda:0 --products 1024 \
        --reasoning off --compile on --workers 14

Products are real: rows of a catalog snapshot (Vendure photos and Fashion-MNIST items).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class BenchRow:
    preset: str
    reasoning: bool
    compiled: bool
    device: str
    dtype: str
    products: int
    products_per_s: float
    forward_products_per_s: float
    preprocess_share: float
    forward_share: float
    tflops_achieved: float | None = None
    peak_fraction: float | None = None


def load_products(snapshot: str | None, count: int) -> list:
    """``count`` real products from a snapshot Parquet file (built from the sample data if none)."""
    import tempfile
    from datetime import date

    import pyarrow.parquet as pq

    from model.moon3_predictor import products_from_arrow

    if snapshot is None:
        from jobs.sample_catalog import build_sample_snapshots
        from moonpipe.settings import Settings

        folder = tempfile.mkdtemp(prefix="moon3-bench-")
        build_sample_snapshots(folder, Settings.from_env().raw_data_dir, date(2026, 11, 1), days=1, fashion_items=300)
        snapshot = f"{folder}/dt=2026-11-01/catalog.parquet"
    rows = products_from_arrow(pq.read_table(snapshot))
    # Interleave sources (photos and Fashion-MNIST items) and repeat to reach the count.
    return [rows[(i * 7) % len(rows)] for i in range(count)]


def bench_one(preset: str, reasoning: bool, products: list, device: str, token_budget: int | None,
              workers: int, warmup: int = 8, compile_model: bool = False, max_batch: int = 256) -> BenchRow:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.moon3_config import Moon3Config
    from model.moon3_predictor import make_predict_fn

    predict = make_predict_fn(
        Moon3Config(backbone=preset, reasoning=reasoning),
        device=device,
        token_budget=token_budget,
        max_batch=max_batch,
        preprocess_workers=workers,
        compile_model=compile_model,
    )
    predict(products[:warmup])  # first-call costs (allocator, kernels) are not throughput
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = predict(products)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    pre, fwd = result.timings["preprocess"], result.timings["forward"]
    row = BenchRow(
        preset=preset,
        reasoning=reasoning,
        compiled=compile_model,
        device=device,
        dtype="bfloat16" if device.startswith("cuda") else "float32",
        products=len(products),
        products_per_s=len(products) / elapsed,
        forward_products_per_s=len(products) / fwd,
        preprocess_share=pre / elapsed,
        forward_share=fwd / elapsed,
    )
    from training.throughput import datasheet_peak

    peak = datasheet_peak(torch.device(device), torch.bfloat16)  # None off a GPU of the datasheet table
    if peak is not None:
        # FlopCounterMode has no formula for grouped-query SDPA: count an eager-attention pass, which
        # performs the same matrix products, then go back to SDPA.
        backbone = predict.model.backbone
        backbone.set_attn_implementation({"text_config": "eager"})
        counter = FlopCounterMode(display=False)
        with counter:
            predict(products)
        backbone.set_attn_implementation({"text_config": "sdpa"})
        row.tflops_achieved = counter.get_total_flops() / fwd / 1e12
        row.peak_fraction = row.tflops_achieved * 1e12 / peak
    del predict
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def run(presets: list[str], products: int, device: str, snapshot: str | None, token_budget: int | None,
        workers: int, reasoning_modes: list[bool], reasoning_products: int | None,
        compile_modes: list[bool], warmup: int, max_batch: int = 256) -> list[BenchRow]:
    items = load_products(snapshot, products)
    rows = []
    for preset in presets:
        for reasoning in reasoning_modes:
            for compiled in compile_modes:
                subset = items[:reasoning_products] if reasoning and reasoning_products else items
                # Compilation and the GPU's kernel/plan caches warm up over a whole pass, not a few rows.
                full_warmup = compiled or device.startswith("cuda")
                row = bench_one(preset, reasoning, subset, device, token_budget, workers,
                                warmup=len(subset) if full_warmup else warmup, compile_model=compiled,
                                max_batch=max_batch)
                rows.append(row)
                print(_format(row), flush=True)
    return rows


def _format(row: BenchRow) -> str:
    mfu = f"  {row.tflops_achieved:7.1f} TFLOP/s = {row.peak_fraction:5.1%} of peak" if row.peak_fraction else ""
    return (
        f"{row.preset:18s} reasoning {'on ' if row.reasoning else 'off'} {'compiled' if row.compiled else 'eager   '} {row.device:7s} {row.dtype:8s} "
        f"{row.products:5d} products  {row.products_per_s:9.1f}/s end to end  "
        f"{row.forward_products_per_s:9.1f}/s in the model  preprocess {row.preprocess_share:5.1%}  "
        f"forward {row.forward_share:5.1%}{mfu}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moonpipe bench moon3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated backbone presets")
    parser.add_argument("--products", type=int, default=128)
    parser.add_argument("--reasoning-products", type=int, default=None, help="fewer products for reasoning on")
    parser.add_argument("--reasoning", default="off,on", help="off, on or off,on")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--snapshot", default=None, help="catalog.parquet to take products from")
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=256, help="most products in one forward pass")
    parser.add_argument("--workers", type=int, default=1, help="preprocessing threads")
    parser.add_argument("--compile", default="off", help="torch.compile the decoder layers: off, on or off,on")
    parser.add_argument("--warmup", type=int, default=8, help="products run before timing (all of them when compiled)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(
        [p.strip() for p in args.presets.split(",") if p.strip()],
        args.products,
        args.device,
        args.snapshot,
        args.token_budget,
        args.workers,
        [mode.strip() == "on" for mode in args.reasoning.split(",")],
        args.reasoning_products,
        [mode.strip() == "on" for mode in args.compile.split(",")],
        args.warmup,
        args.max_batch,
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
