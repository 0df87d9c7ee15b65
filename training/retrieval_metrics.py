"""Retrieval metrics over embeddings (numpy, chunked so 10k x 10k never sits in memory at once).

* Recall@K: share of queries with at least one relevant item in their top K.
* mAP@K: mean over queries of average precision within the top K (precision at each relevant hit,
  divided by min(K, number of relevant items)).
* kNN accuracy: majority label of the K nearest gallery items (ties broken by summed similarity).
"""

from __future__ import annotations

import numpy as np


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False,
          chunk: int = 1024, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Indexes [Q, k] and scores of the k best gallery items per query (cosine: inner product of
    normalised vectors; ``l2``: negative squared distance)."""
    k = min(k, len(gallery) - (1 if exclude_self else 0))
    indexes = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    gallery_sq = (gallery.astype(np.float32) ** 2).sum(1) if metric == "l2" else None
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk].astype(np.float32)
        sims = block @ gallery.T.astype(np.float32)
        if metric == "l2":
            sims = 2 * sims - gallery_sq[None, :] - (block**2).sum(1)[:, None]
        if exclude_self:
            rows = np.arange(len(block))
            sims[rows, start + rows] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1)
        indexes[start:start + len(block)] = np.take_along_axis(part, order, axis=1)
        scores[start:start + len(block)] = np.take_along_axis(part_scores, order, axis=1)
    return indexes, scores


def recall_and_map(relevant: np.ndarray, relevant_counts: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """From a [Q, K] boolean matrix of hits in rank order and each query's number of relevant items."""
    metrics = {}
    for k in ks:
        metrics[f"recall@{k}"] = float(relevant[:, :k].any(axis=1).mean())
    k = relevant.shape[1]
    hits = relevant.astype(np.float64)
    precision = np.cumsum(hits, axis=1) / np.arange(1, k + 1)[None, :]
    denominators = np.minimum(relevant_counts, k).clip(min=1)
    metrics[f"map@{k}"] = float(((precision * hits).sum(axis=1) / denominators).mean())
    return metrics


def knn_accuracy(neighbour_labels: np.ndarray, neighbour_scores: np.ndarray, true_labels: np.ndarray) -> float:
    votes = np.zeros((len(true_labels), int(max(neighbour_labels.max(), true_labels.max())) + 1))
    for column in range(neighbour_labels.shape[1]):
        np.add.at(votes, (np.arange(len(true_labels)), neighbour_labels[:, column]), 1.0)
    tie_break = np.zeros_like(votes)
    for column in range(neighbour_labels.shape[1]):
        np.add.at(tie_break, (np.arange(len(true_labels)), neighbour_labels[:, column]), neighbour_scores[:, column])
    # Scores are bounded, so 1e-3 x a normalised tie-break never outweighs one vote.
    span = np.abs(tie_break).max() or 1.0
    predicted = np.argmax(votes + 1e-3 * tie_break / span, axis=1)
    return float((predicted == true_labels).mean())
