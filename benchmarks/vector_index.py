"""The vector index on synthetic clustered vectors, side by side with autofaiss, in one run.

    .venv/bin/python -m benchmarks.vector_index                       # 1M x 256, budgets 2G and 512M
    .venv/bin/python -m benchmarks.vector_index --n 200000 --skip-autofaiss

Data: ``--centres`` Gaussian centres, points = centre + noise, L2-normalised, saved once to
``vectors.npy`` (plus fresh query points, not indexed, and their exact top-10). Every build runs in
its own subprocess on those files, so peak memory (ru_maxrss) is per build: ours through
moonpipe.vector_index (the same code as `moonpipe index build`, reading the file in batches),
autofaiss (criteo) in its own environment (infra/setup/autofaiss_env.sh; it pins numpy<2) with the
budget as ``max_index_memory_usage``. Recall@10 and single-query latency (one thread, one query at a
time) of every index are measured here by the same code on the same queries.

Build time is wall time of choosing + sampling + training + adding + tuning (ours also computes
exact search for its own recall measurement inside "add"); for autofaiss, its build_index call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
AUTOFAISS_ENV = PROJECT / ".bench-envs" / "autofaiss"

AUTOFAISS_RUNNER = r"""
import json, resource, sys, time, types
import faiss
import autofaiss.indices.index_factory as autofaiss_factory
from autofaiss import build_index

# autofaiss' OPQ path calls OPQMatrix(d, M=.., d2=..), keywords faiss 1.15's SWIG wrapper rejects:
# give its module a faiss whose OPQMatrix takes them, positionally passed on (nothing else changes).
class FaissWithKeywordOPQ(types.ModuleType):
    def __getattr__(self, name):
        return getattr(faiss, name)
compat = FaissWithKeywordOPQ("faiss")
compat.OPQMatrix = lambda d=0, M=1, d2=-1: faiss.OPQMatrix(d, M, d2)
autofaiss_factory.faiss = compat

args = json.loads(sys.argv[1])
start = time.perf_counter()
index, infos = build_index(
    embeddings=args["embeddings"], index_path=args["index_path"], index_infos_path=args["infos_path"],
    max_index_memory_usage=args["budget"], current_memory_available=args["build_memory"],
    max_index_query_time_ms=args["query_ms"], metric_type="ip", nb_cores=args["cores"], verbose=30)
seconds = time.perf_counter() - start
if index is None:
    raise SystemExit("autofaiss returned no index: " + json.dumps(infos))
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "index_key": infos.get("index_key"), "index_param": infos.get("index_param")}))
"""


def make_data(folder: Path, n: int, dim: int, centres: int, noise: float, queries: int, seed: int) -> None:
    """vectors.npy (in embeddings/, the folder autofaiss reads), queries.npy, exact_ids.npy."""
    import faiss

    vectors_path = folder / "embeddings" / "vectors.npy"
    stamp = folder / "params.json"
    params = {"n": n, "dim": dim, "centres": centres, "noise": noise, "queries": queries, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    vectors_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(centres, dim)) / np.sqrt(dim)).astype(np.float32)

    def points(count: int) -> np.ndarray:
        x = means[rng.integers(0, centres, count)] + rng.normal(size=(count, dim)).astype(np.float32) * (noise / np.sqrt(dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    out = np.lib.format.open_memmap(vectors_path, mode="w+", dtype=np.float32, shape=(n, dim))
    chunk = 100_000
    for start in range(0, n, chunk):
        out[start : start + chunk] = points(min(chunk, n - start))
    out.flush()
    del out
    query_vectors = points(queries)
    np.save(folder / "queries.npy", query_vectors)
    data = np.load(vectors_path, mmap_mode="r")
    best_scores = np.full((queries, 10), -np.inf, np.float32)
    best_ids = np.full((queries, 10), -1, np.int64)
    for start in range(0, n, chunk):
        scores, ids = faiss.knn(query_vectors, np.ascontiguousarray(data[start : start + chunk]), 10,
                                metric=faiss.METRIC_INNER_PRODUCT)
        all_s, all_i = np.hstack([best_scores, scores]), np.hstack([best_ids, ids + start])
        order = np.argsort(-all_s, axis=1)[:, :10]
        best_scores, best_ids = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    np.save(folder / "exact_ids.npy", best_ids)
    stamp.write_text(json.dumps(params))


def evaluate(index_path: Path, folder: Path, params: dict | None, param_string: str | None) -> dict:
    """Recall@10 and single-query p50/p99 of a saved index, measured the same way for every tool."""
    import faiss

    from moonpipe.vector_index.tuning import measure_latency, recall_at_k, search_parameters

    index = faiss.read_index(str(index_path))
    if param_string:
        faiss.ParameterSpace().set_index_parameters(index, param_string)
    queries = np.load(folder / "queries.npy")
    exact = np.load(folder / "exact_ids.npy")
    search = search_parameters(index, params) if params is not None else None
    _, found = index.search(queries, 10, params=search)
    p50, p99 = measure_latency(index, queries, params, 10)
    return {"recall_at_10": round(recall_at_k(found, exact, 10), 4), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "index_mb": round(index_path.stat().st_size / 2**20, 1)}


def child_ours(args: argparse.Namespace) -> None:
    """One build of ours (run in its own process for a per-build peak memory)."""
    import faiss

    from moonpipe.vector_index.build import BuildOptions, build_index_from_source
    from moonpipe.vector_index.sources import NpyVectors

    folder = Path(args.workdir)
    source = NpyVectors(folder / "embeddings" / "vectors.npy")
    queries = np.load(folder / "queries.npy")
    start = time.perf_counter()
    built = build_index_from_source(source, BuildOptions(memory_budget=args.budget, force_index=args.force or None,
                                                         queries=len(queries)), queries=queries)
    seconds = time.perf_counter() - start - built.seconds.get("measure", 0)
    faiss.write_index(built.index, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "index_key": built.choice.factory, "params": built.params, "stages": built.seconds}))


def run_child(command: list[str], timeout: int, env: dict | None = None) -> dict:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}… failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.vector_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to a centre's (1.0)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", default="2G,512M")
    parser.add_argument("--extra", default="IVF{nlist},PQ64x4fs",
                        help="';'-separated FAISS factory strings built beside the rule's choice ('' for none); "
                        "{nlist} is the rule's list count for --n")
    parser.add_argument("--skip-autofaiss", action="store_true")
    parser.add_argument("--autofaiss-query-ms", type=float, default=10.0, help="autofaiss' latency bound (its default)")
    parser.add_argument("--autofaiss-build-memory", default="6G")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per build")
    parser.add_argument("--workdir", default=None, help="data and indices (default $MOONPIPE_TMP/bench-vector-index)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--force", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workdir is None:
        from moonpipe.settings import Settings

        args.workdir = f"{Settings.from_env().tmp_dir}/bench-vector-index"
    if args.child:
        child_ours(args)
        return 0

    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    make_data(folder, args.n, args.dim, args.centres, args.noise, args.queries, args.seed)
    print(f"data: {args.n:,} x {args.dim} ({args.centres} centres, noise {args.noise}), {args.queries} fresh queries, "
          f"ready in {time.perf_counter() - clock:.0f} s; {os.cpu_count()} CPUs", flush=True)
    autofaiss_python = AUTOFAISS_ENV / "bin" / "python"
    if not args.skip_autofaiss and not autofaiss_python.exists():
        print(f"autofaiss: no environment at {AUTOFAISS_ENV}: run infra/setup/autofaiss_env.sh (or --skip-autofaiss)")
        return 2

    rows = []
    header = f"{'budget':>6s} {'tool':9s} {'index':34s} {'params':28s} {'build s':>8s} {'peak MB':>8s} {'index MB':>8s} {'recall@10':>9s} {'p50 ms':>7s} {'p99 ms':>7s}"
    print(header, flush=True)
    for budget in args.budgets.split(","):
        tag = budget.lower()
        from moonpipe.vector_index.choice import nlist_for

        choices = [""] + [c.format(nlist=nlist_for(args.n)) for c in args.extra.split(";") if c]
        for force in choices:
            out = folder / f"ours-{tag}-{(force or 'auto').replace(',', '_')}.faiss"
            result = run_child([sys.executable, "-m", "benchmarks.vector_index", "--child", "--workdir", str(folder),
                                "--budget", budget, "--force", force, "--out", str(out)], args.timeout)
            result |= evaluate(out, folder, result["params"], None)
            rows.append({"budget": budget, "tool": "moonpipe" if not force else "moonpipe*", **result})
            print_row(rows[-1])
        if not args.skip_autofaiss:
            index_path, infos_path = folder / f"autofaiss-{tag}.index", folder / f"autofaiss-{tag}.json"
            spec = {"embeddings": str(folder / "embeddings"), "index_path": str(index_path), "infos_path": str(infos_path),
                    "budget": budget, "build_memory": args.autofaiss_build_memory, "query_ms": args.autofaiss_query_ms,
                    "cores": os.cpu_count()}
            try:
                result = run_child([str(autofaiss_python), "-c", AUTOFAISS_RUNNER, json.dumps(spec)], args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{budget:>6s} autofaiss did not finish within --timeout {args.timeout} s (killed)", flush=True)
                rows.append({"budget": budget, "tool": "autofaiss", "timed_out_after": args.timeout})
                continue
            result |= evaluate(index_path, folder, None, result["index_param"])
            result["params"] = result["index_param"]
            rows.append({"budget": budget, "tool": "autofaiss", **result})
            print_row(rows[-1])
            ours = next(r for r in rows if r["budget"] == budget and r["tool"] == "moonpipe")
            print(f"{budget:>6s} ratio     build time autofaiss / ours = {result['seconds'] / ours['seconds']:.2f}x, "
                  f"p50 autofaiss / ours = {result['p50_ms'] / ours['p50_ms']:.1f}x", flush=True)
    (folder / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    print("moonpipe* = a forced alternative, not the rule's choice; results in", folder / "results.json")
    return 0


def print_row(row: dict) -> None:
    params = row["params"] if isinstance(row["params"], str) else ",".join(f"{k}={v}" for k, v in row["params"].items())
    print(f"{row['budget']:>6s} {row['tool']:9s} {row['index_key']:34s} {params[:28]:28s} {row['seconds']:8.1f} "
          f"{row['peak_rss'] / 2**20:8.0f} {row['index_mb']:8.1f} {row['recall_at_10']:9.4f} {row['p50_ms']:7.3f} "
          f"{row['p99_ms']:7.3f}", flush=True)
    if "stages" in row:
        print(f"{'':17s}stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in row["stages"].items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
