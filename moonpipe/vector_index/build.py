"""Build one FAISS index from a vector source in bounded memory.

    pass 1   a random sample: held-out queries + the training set (queries are kept out of training)
    train    the chosen index on the sample (nothing to train for Flat and HNSW)
    pass 2   add batch by batch with sequential ids (FAISS id = row of the id map); the exact top-k
             of every query is accumulated along the way (brute force per batch, merged), so
             recall is measured against exact search without holding all vectors
    tune     nprobe / efSearch / k_factor on half of the queries to reach the recall target
    measure  recall@k and single-query p50/p99 on the other half

Memory: the index itself, one batch, the training sample and the queries. The sharded build
(``sharded.py``) runs pass 2 on Spark executors with the same ``ShardBuilder``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from moonpipe.progress import stage
from moonpipe.vector_index.choice import IndexChoice, choose_index
from moonpipe.vector_index.sources import DEFAULT_BATCH_ROWS, RejectedRow, VectorBatch, VectorSource
from moonpipe.vector_index.tuning import TuneResult, measure_latency, recall_at_k, search_parameters, tune

LOG = logging.getLogger("moonpipe.vector_index")
METRIC = faiss.METRIC_INNER_PRODUCT  # vectors are L2-normalised: inner product = cosine


@dataclass(frozen=True)
class BuildOptions:
    memory_budget: str = "2G"
    latency_target_ms: float = 1.0
    recall_target: float = 0.95
    k: int = 10
    queries: int = 1000  # held-out queries: half tune the parameters, half measure them
    batch_rows: int = DEFAULT_BATCH_ROWS
    seed: int = 0
    force_index: str | None = None  # a FAISS factory string instead of the rule's choice
    hnsw_max_vectors: int = 200_000

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.k < 1 or self.queries < 2 or self.batch_rows < 1:
            raise ValueError(f"k, queries (>= 2) and batch_rows must be positive: {self}")


class ExactTopK:
    """Running exact top-k (inner product) of fixed queries over vectors seen batch by batch."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = queries
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, vectors: np.ndarray, first_id: int) -> None:
        if len(self.queries) == 0 or len(vectors) == 0:
            return
        scores, rows = faiss.knn(self.queries, vectors, min(self.k, len(vectors)), metric=METRIC)
        self.merge(scores, np.where(rows >= 0, rows + first_id, -1))

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_ids = np.concatenate([self.ids, ids], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.ids = np.take_along_axis(all_ids, order, axis=1)


class ShardBuilder:
    """Adds batches to a trained (empty) index with ids counted from 0, keeping the id map, the
    attributes and the exact top-k of the queries. One per build, or one per Spark partition."""

    def __init__(self, trained: faiss.Index, queries: np.ndarray, k: int) -> None:
        self.index = trained
        self.product_ids: list[str] = []
        self.attributes: list[pa.Array] = []
        self.rejected: list[RejectedRow] = []
        self.exact = ExactTopK(queries, k)

    def add(self, batch: VectorBatch, rejected: list[RejectedRow] = ()) -> None:
        self.rejected.extend(rejected)
        if not len(batch):
            return
        first = len(self.product_ids)
        self.index.add(batch.vectors)
        self.exact.update(batch.vectors, first)
        self.product_ids.extend(batch.product_ids)
        if batch.attributes is not None:
            self.attributes.append(batch.attributes)

    def id_map(self) -> pa.Table:
        """faiss_id -> product_id (+ generated attributes when the source has them)."""
        columns: dict[str, Any] = {
            "faiss_id": pa.array(np.arange(len(self.product_ids), dtype=np.int64)),
            "product_id": pa.array(self.product_ids, pa.string()),
        }
        if self.attributes:
            columns["attributes"] = pa.concat_arrays(self.attributes)
        return pa.table(columns)


@dataclass
class BuiltIndex:
    """An index ready to publish, with how it was built and how well it searches."""

    index: faiss.Index
    id_map: pa.Table
    choice: IndexChoice
    params: dict[str, int]
    recall_at_k: float
    recall_target_reached: bool
    latency_p50_ms: float
    latency_p99_ms: float
    k: int
    rejected: list[RejectedRow] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tuning: TuneResult | None = None

    @property
    def vector_count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.index.d)


def draw_sample(source: VectorSource, wanted: int, seed: int) -> np.ndarray:
    """About ``wanted`` valid vectors picked uniformly in one streaming pass (each row with the
    same probability), in random order."""
    rng = np.random.default_rng(seed)
    keep_probability = min(1.0, wanted / max(source.row_count, 1))
    picked: list[np.ndarray] = []
    for batch, _ in source.batches():
        if len(batch):
            mask = rng.random(len(batch)) < keep_probability
            picked.append(batch.vectors[mask])
    sample = np.concatenate(picked) if picked else np.empty((0, source.dimension), np.float32)
    return sample[rng.permutation(len(sample))]


def split_queries(sample: np.ndarray, options: BuildOptions, choice: IndexChoice) -> tuple[np.ndarray, np.ndarray]:
    """(queries, training set). Queries are held out of training while the sample allows it."""
    count = min(options.queries, max(2, len(sample) // 5)) if choice.needs_training else min(options.queries, len(sample))
    queries, rest = sample[:count], sample[count:]
    training = rest if len(rest) >= choice.train_size or not choice.needs_training else sample
    return np.ascontiguousarray(queries), np.ascontiguousarray(training[: choice.train_size])


def new_index(choice: IndexChoice) -> faiss.Index:
    return faiss.index_factory(choice.dimension, choice.factory, METRIC)


def use_gpus_for_clustering(index: faiss.Index) -> bool:
    """With FAISS' GPU build installed (the ``faiss-gpu`` extra) and a GPU visible, run the IVF
    k-means (the build's biggest cost) on the GPUs; the trained index stays a CPU index."""
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return False
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False  # no inverted lists: nothing to cluster
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    return True


def train_index(choice: IndexChoice, training: np.ndarray) -> faiss.Index:
    index = new_index(choice)
    if use_gpus_for_clustering(index):
        LOG.info("index: k-means on %d GPU(s)", faiss.get_num_gpus())
    if not index.is_trained:
        if len(training) < (choice.nlist or 1):
            raise ValueError(
                f"{choice.factory} needs at least {choice.nlist} training vectors, the sample has {len(training)}"
            )
        index.train(training)
    return index


def finish(index: faiss.Index, id_map: pa.Table, exact_ids: np.ndarray, queries: np.ndarray, choice: IndexChoice,
           options: BuildOptions, rejected: list[RejectedRow], seconds: dict[str, float]) -> BuiltIndex:
    """Tune on half of the queries, measure recall and latency on the other half."""
    half = max(1, len(queries) // 2)
    tune_q, eval_q = queries[:half], queries[half:]
    tune_ids, eval_ids = exact_ids[:half], exact_ids[half:]
    if len(eval_q) == 0:  # a single query: tuned and measured on the same one
        eval_q, eval_ids = tune_q, tune_ids
    k = min(options.k, int(index.ntotal))
    clock = time.perf_counter()
    with stage(f"index: tune {choice.factory} to recall@{k} >= {options.recall_target}", LOG):
        tuned = tune(index, tune_q, tune_ids[:, :k], k=k, recall_target=options.recall_target)
    seconds["tune"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    with stage("index: measure recall and latency on held-out queries", LOG) as record:
        _, found = index.search(eval_q, k, params=search_parameters(index, tuned.params))
        recall = recall_at_k(found, eval_ids[:, :k], k)
        p50, p99 = measure_latency(index, eval_q, tuned.params, k)
        record.rows = len(eval_q)
    seconds["measure"] = round(time.perf_counter() - clock, 3)
    LOG.info("index %s %s: recall@%d %.4f, p50 %.3f ms, p99 %.3f ms", choice.factory, tuned.params, k, recall, p50, p99)
    return BuiltIndex(
        index=index, id_map=id_map, choice=choice, params=tuned.params, recall_at_k=round(recall, 4),
        recall_target_reached=recall >= options.recall_target, latency_p50_ms=round(p50, 4),
        latency_p99_ms=round(p99, 4), k=k, rejected=rejected, seconds=seconds, tuning=tuned,
    )


def build_index_from_source(source: VectorSource, options: BuildOptions = BuildOptions(),
                            queries: np.ndarray | None = None) -> BuiltIndex:
    """Choose, train, add, tune and measure an index over ``source``. ``queries`` replaces the
    held-out sample (benchmarks pass fresh points that are not in the index)."""
    seconds: dict[str, float] = {}
    choice = choose_index(source.row_count, source.dimension, options.memory_budget, options.latency_target_ms,
                          hnsw_max_vectors=options.hnsw_max_vectors, force=options.force_index)
    LOG.info("index: %s for %s (%s; est. %d MB)", choice.factory, source.description, choice.reason,
             choice.estimated_bytes >> 20)
    clock = time.perf_counter()
    with stage("index: sample queries and training vectors", LOG) as record:
        wanted = (0 if queries is not None else options.queries) + choice.train_size
        sample = draw_sample(source, int(wanted * 1.05) + 10, options.seed) if wanted else np.empty((0, source.dimension), np.float32)
        if queries is None:
            queries, training = split_queries(sample, options, choice)
        else:
            queries, training = np.ascontiguousarray(queries, np.float32), sample[: choice.train_size]
        record.rows = len(sample)
    if len(queries) == 0:
        raise ValueError(f"{source.description}: no valid vector to draw queries from")
    seconds["sample"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    with stage(f"index: train {choice.factory}", LOG) as record:
        index = train_index(choice, training)
        record.rows = len(training) if choice.needs_training else 0
    seconds["train"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    with stage(f"index: add vectors in batches of {options.batch_rows:,}", LOG) as record:
        builder = ShardBuilder(index, queries, options.k)
        for batch, rejected in source.batches(options.batch_rows):
            builder.add(batch, rejected)
        record.rows = int(index.ntotal)
    seconds["add"] = round(time.perf_counter() - clock, 3)
    if index.ntotal == 0:
        raise ValueError(f"{source.description}: every row was rejected ({len(builder.rejected)}), nothing to index")
    return finish(index, builder.id_map(), builder.exact.ids, queries, choice, options, builder.rejected, seconds)
