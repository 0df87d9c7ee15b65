"""Creative scoring, measured side by side in one run (`moonpipe creatives bench`):

1. the scheduler: for N = 4, 8, 16, 32 creatives, the comparisons it uses against the budget
   2·N·log2 N and the N(N-1) of all pairs, and its agreement (Kendall tau) with the ranking from
   all pairs, with a simulated judge: deterministic per ordered pair like greedy decoding, noisy
   (Gaussian logit noise) and position-biased (+0.3 logit for A), over many random groups;
2. the scoring job: comparisons/s of `score_creatives` on Spark (local) with the tiny Creative4U,
   next to the bare model judging the same kind of comparisons in one process.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import tempfile
import time
from datetime import date

GOAL_TAU = 0.9


def scheduler_rows(sizes: list[int], trials: int, noise: float, bias: float = 0.3) -> list[dict]:
    from scipy.stats import kendalltau

    from jobs.creative_ranking import JudgedComparison, aggregate, comparison_budget, pair_preference, rank_group

    rows = []
    for n in sizes:
        used, tau_all, tau_truth_sched, tau_truth_all = [], [], [], []
        for trial in range(trials):
            rng = random.Random(1000 * n + trial)
            quality = {f"c{i:02d}": rng.gauss(0, 1.5) for i in range(n)}
            logit_noise = {(a, b): rng.gauss(0, noise) for a, b in itertools.permutations(quality, 2)}

            def prob_a(a: str, b: str) -> float:
                return 1 / (1 + math.exp(-(quality[a] - quality[b] + bias + logit_noise[(a, b)])))

            def judged(pairs):
                return [JudgedComparison(a, b, "A" if prob_a(a, b) >= 0.5 else "B", prob_a(a, b)) for a, b in pairs]

            items = list(quality)
            rng.shuffle(items)
            full = {s.creative_id: s.rank for s in aggregate(items, judged(itertools.permutations(items, 2)))}
            run = rank_group(items, lambda x, y: pair_preference(prob_a(x, y), prob_a(y, x)))
            pairs = [p for x, y in run.preferences for p in ((x, y), (y, x))]
            scheduled = {s.creative_id: s.rank for s in aggregate(items, judged(pairs))}
            truth = {c: r for r, c in enumerate(sorted(quality, key=quality.get, reverse=True), start=1)}
            used.append(len(pairs))
            tau_all.append(kendalltau([full[c] for c in items], [scheduled[c] for c in items])[0])
            tau_truth_sched.append(kendalltau([truth[c] for c in items], [scheduled[c] for c in items])[0])
            tau_truth_all.append(kendalltau([truth[c] for c in items], [full[c] for c in items])[0])
        rows.append({
            "n": n, "budget": comparison_budget(n), "all_pairs": n * (n - 1), "used_max": max(used),
            "used_mean": statistics.mean(used), "tau_mean": statistics.mean(tau_all), "tau_min": min(tau_all),
            "truth_sched": statistics.mean(tau_truth_sched), "truth_all": statistics.mean(tau_truth_all),
        })
    return rows


def print_scheduler(rows: list[dict], noise: float, trials: int) -> bool:
    print(f"\nScheduler vs all pairs (simulated judge: logit noise sd {noise}, A-position bias +0.3; {trials} groups per N)")
    print(f"{'N':>3s} {'budget':>7s} {'all':>5s} {'used max':>9s} {'used/all':>9s} {'tau mean':>9s} {'tau min':>8s} "
          f"{'truth: sched':>13s} {'truth: all':>11s}  goal")
    met = True
    for r in rows:
        ok = r["tau_mean"] >= GOAL_TAU and r["used_max"] <= r["budget"]
        met &= ok
        print(f"{r['n']:3d} {r['budget']:7d} {r['all_pairs']:5d} {r['used_max']:9d} {r['used_max'] / r['all_pairs']:9.2f} "
              f"{r['tau_mean']:9.3f} {r['tau_min']:8.3f} {r['truth_sched']:13.3f} {r['truth_all']:11.3f}  "
              f"{'met' if ok else 'MISSED'}")
    return met


def job_throughput(products: int, per_product: int, preset: str, think_tokens: int, bare_threads: int) -> None:
    from jobs.creative_data import build_creative_data
    from jobs.score_creatives import score_creatives
    from model.creative4u import Comparison
    from model.creative4u_checkpoint import build_model, save_checkpoint
    from model.creative4u_config import Creative4UConfig
    from model.creative4u_protocol import PairPrompt
    from moonpipe import delta
    from moonpipe.settings import Settings
    from moonpipe.spark_session import get_spark

    settings = Settings.from_env(home=tempfile.mkdtemp(prefix="moonpipe-bench-creatives-"))
    spark = get_spark(conf={"spark.ui.enabled": "false"})
    model = build_model(Creative4UConfig(backbone=preset, decoding="guided", guided_think_tokens=think_tokens))
    save_checkpoint(model, settings.creative_model)
    vendure = (products + 1) // 2
    build_creative_data(date(2026, 11, 1), settings, spark, vendure_products=vendure, fashion_products=products - vendure,
                        creatives_per_product=per_product, mean_impressions=50)
    summary = score_creatives(date(2026, 11, 1), settings, spark)
    creatives = delta.read_arrow(settings.table_uri("creatives"), columns=["product_title", "image_bytes"]).to_pylist()
    prompt = PairPrompt(creatives[0]["product_title"], ("sale sneakers", "cheap laptop"))
    comparisons = [
        Comparison(prompt, a["image_bytes"], b["image_bytes"])
        for a, b in itertools.islice(itertools.permutations(creatives, 2), min(summary.comparisons, 256))
    ]
    import os

    import torch

    # Like one Spark task (spark.task.cpus=1): more threads than free cores make small CPU
    # kernels spin-wait, which on a shared machine costs far more than it gains.
    torch.set_num_threads(bare_threads)
    model.judge(comparisons[:16])  # warm-up
    clock = time.perf_counter()
    model.judge(comparisons)
    bare = len(comparisons) / (time.perf_counter() - clock)
    job = summary.comparisons_per_second or 0.0
    print(f"\nScoring job, {preset} Creative4U, guided decoding ({think_tokens} reasoning tokens), "
          f"{summary.groups_scored} groups of {per_product} creatives:")
    print(f"  comparisons: {summary.comparisons} (all pairs would be {summary.all_pairs_comparisons}), "
          f"model stage {summary.seconds['model']:.1f} s, whole job {sum(summary.seconds.values()):.1f} s")
    print(f"  Spark job (model stage, incl. worker start and model load): {job:8.1f} comparisons/s")
    print(f"  bare model, one process, {bare_threads} thread(s), {len(comparisons)} comparisons: {bare:8.1f} comparisons/s")
    print(f"  ratio job / bare: {job / bare:.2f}   (Spark: {spark.sparkContext.defaultParallelism} task slots; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moonpipe creatives bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,8,16,32", help="group sizes N (4,8,16,32)")
    parser.add_argument("--trials", type=int, default=30, help="random groups per N (30)")
    parser.add_argument("--noise", default="0.5,1.0", help="judge logit noise sd values (0.5,1.0)")
    parser.add_argument("--products", type=int, default=4, help="products for the job benchmark (4)")
    parser.add_argument("--per-product", type=int, default=8, help="creatives per product (8)")
    parser.add_argument("--preset", default="tiny", help="Creative4U backbone preset (tiny)")
    parser.add_argument("--think-tokens", type=int, default=16, help="guided reasoning tokens (16)")
    parser.add_argument("--bare-threads", type=int, default=1, help="torch threads of the bare model (1 = a task)")
    parser.add_argument("--only", choices=["scheduler", "job"], default=None, help="run one part")
    args = parser.parse_args(argv)
    met = True
    if args.only in (None, "scheduler"):
        sizes = [int(s) for s in args.sizes.split(",")]
        for noise in (float(x) for x in args.noise.split(",")):
            met &= print_scheduler(scheduler_rows(sizes, args.trials, noise), noise, args.trials)
    if args.only in (None, "job"):
        job_throughput(args.products, args.per_product, args.preset, args.think_tokens, args.bare_threads)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
