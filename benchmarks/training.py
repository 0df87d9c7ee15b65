"""MOON3.0 training throughput, measured side by side in one run.

Each variant trains the same number of real DeepSpeed steps on the same exported training set
(real Fashion-MNIST images) in one process; the table gives samples/s (anchors per second) and
each variant's cost relative to the first, and the model FLOP/s (counted by the trainer,
training/throughput.py) as a fraction of one rank's peak (datasheet on known GPUs, else a
measured matrix product). Variants:

    nce          InfoNCE only (query->product and product<->product)
    nce+sft      plus the SFT term on every step
    joint        InfoNCE + SFT + GRPO on every step (G samples per product)
    joint-zero3  the same under ZeRO stage 3
    nce+sft+worker  nce+sft with one input worker process building the next steps' inputs
                 (``--worker-threads`` torch threads for the model: on 2 cores, 1 thread + 1 worker)

    python -m benchmarks.training --preset tiny --steps 6 --batch 16
    python -m benchmarks.training --preset small --steps 4 --variants nce,joint
    python -m benchmarks.training --batch 64 --image-pixels 7056 --steps 40 --threads 2 \
        --worker-threads 1 --variants nce+sft,nce+sft+worker

The first step of each variant (DeepSpeed set-up, first allocation) is excluded from the timing;
variants run interleaved over ``--rounds`` and each keeps its best round (the machine's load drifts).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

VARIANTS = {
    "nce": {"sft_warmup_steps": 0, "sft_weight": 0.0, "grpo_weight": 0.0},
    "nce+sft": {"sft_warmup_steps": 0, "sft_weight": 0.1, "grpo_weight": 0.0},
    "joint": {"sft_warmup_steps": 0, "sft_weight": 0.1, "grpo_weight": 0.5, "grpo_every": 1},
    "joint-zero3": {"sft_warmup_steps": 0, "sft_weight": 0.1, "grpo_weight": 0.5, "grpo_every": 1,
                    "run": {"zero": "zero3"}},
    "nce+sft+worker": {"sft_warmup_steps": 0, "sft_weight": 0.1, "grpo_weight": 0.0, "run": {"input_workers": 1}},
}


def _steady_rates(metrics_path: Path, batch: int) -> tuple[float, float]:
    """Samples/s and model FLOP/s over steps 2..N (step 1 carries the set-up and the FLOP count)."""
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    if len(lines) < 2:
        raise ValueError(f"{metrics_path}: need at least 2 steps to time")
    seconds = lines[-1]["seconds"] - lines[0]["seconds"]
    return (len(lines) - 1) * batch / seconds, sum(line["step_flops"] for line in lines[1:]) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-pixels", type=int, default=56 * 56)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="torch threads of the variants with input workers (default: --threads)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the best round is kept")
    parser.add_argument("--home", default=None, help="MOONPIPE_HOME to use (default: a temporary folder)")
    args = parser.parse_args(argv)

    home = args.home or tempfile.mkdtemp(prefix="moonpipe-bench-training-")
    os.environ["MOONPIPE_HOME"] = home
    import torch

    from jobs.training_data import export_training_sets
    from moonpipe.settings import Settings
    from moonpipe.spark_session import get_spark
    from training.launch import train
    from training.throughput import peak_flops

    settings = Settings.from_env(home=home)
    spark = get_spark()
    export_training_sets(date(2026, 11, 3), settings, spark, fashion_train_limit=max(512, 8 * args.batch),
                         fashion_test_limit=64)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    best: dict[str, dict] = {}
    # Variants interleaved over rounds, best round kept: on a shared machine the load drifts, and
    # the fastest round is the closest to what the variant costs by itself.
    for round_index in range(args.rounds):
        for name in names:
            overrides = json.loads(json.dumps(VARIANTS[name]))
            run = {"run_name": f"bench-{name}-{round_index}-{int(time.time())}", "max_steps": args.steps,
                   "micro_batch": args.batch, "checkpoint_every": 0, "threads": args.threads, "warmup_steps": 1,
                   **overrides.pop("run", {})}
            if run.get("input_workers") and args.worker_threads is not None:
                run["threads"] = args.worker_threads
            # The photos (28x28) are upscaled to the whole budget, so a larger --image-pixels means more patches.
            config = {"run": run, "backbone": args.preset, "image_pixels": args.image_pixels,
                      "min_image_pixels": args.image_pixels, **overrides}
            summary = train("moon3", config, settings=settings)
            rate, flops = _steady_rates(Path(summary["run_dir"]) / "metrics.jsonl", args.batch)
            if name not in best or rate > best[name]["samples_per_s"]:
                best[name] = {"variant": name, "zero_stage": summary["zero_stage"],
                              "precision": summary["precision"], "samples_per_s": round(rate, 2), "flops": flops}
    # One peak for every row, measured once here with the runs' threads (a matmul's speed drifts
    # with the machine's load as much as the variants differ).
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = {"bf16": torch.bfloat16, "fp32": torch.float32}[best[names[0]]["precision"]]
    peak, peak_source = peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"), precision)
    rows = [best[name] for name in names]
    base = rows[0]["samples_per_s"]
    print(f"MOON3.0 training throughput, preset {args.preset}, batch {args.batch}, {args.steps} steps per "
          f"variant, best of {args.rounds} interleaved rounds")
    print(f"{'variant':16s} {'ZeRO':>4s} {'precision':>9s} {'samples/s':>10s} {'vs first':>9s} "
          f"{'TFLOP/s':>8s} {'of peak':>8s}")
    for row in rows:
        print(f"{row['variant']:16s} {row['zero_stage']:4d} {row['precision']:>9s} {row['samples_per_s']:10.2f} "
              f"{row['samples_per_s'] / base:8.2f}x {row['flops'] / 1e12:8.4f} {row['flops'] / peak:8.2%}")
    print(f"peak: {peak / 1e12:.3f} TFLOP/s, {peak_source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
