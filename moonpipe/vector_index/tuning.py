"""Search parameters, recall against exact search, single-query latency, and tuning to a recall target.

Tuning runs on one half of the held-out queries and the recall and latency recorded with the index
are measured on the other half, so the reported recall is not the one the parameters were fitted to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
K_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)


@contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def unwrap(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index)


def search_parameters(index: faiss.Index, params: dict[str, int], selector: Any = None) -> Any:
    """FAISS SearchParameters for ``index`` from ``{"nprobe": .., "efSearch": .., "k_factor": ..}``.

    ``selector`` (a faiss.IDSelector) restricts the search to some ids (attribute filters). The
    returned object keeps its nested parameters alive (SWIG does not own them)."""
    index = unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        base = search_parameters(index.base_index, params, selector)
        out = faiss.IndexRefineSearchParameters(k_factor=float(params.get("k_factor", 1)), base_index_params=base)
        out._keep = base
        return out
    if isinstance(index, faiss.IndexIVF):
        out = faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 1)))
    elif isinstance(index, faiss.IndexHNSW):
        out = faiss.SearchParametersHNSW(efSearch=int(params.get("efSearch", 16)))
    elif selector is None:
        return None
    else:
        out = faiss.SearchParameters()
    if selector is not None:
        out.sel = selector
        out._keep_sel = selector
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    hits = sum(len(set(f[:k].tolist()) & set(e[:k].tolist()) - {-1}) for f, e in zip(found, exact))
    return hits / (k * len(exact))


def measure_latency(index: faiss.Index, queries: np.ndarray, params: dict[str, int] | None,
                    k: int = 10) -> tuple[float, float]:
    """Single-query latency (p50, p99) in ms, one query at a time on one thread, as a serving
    process answers a request. ``params=None``: the parameters set on the index itself."""
    search = search_parameters(index, params) if params is not None else None
    times = np.empty(len(queries))
    with faiss_threads(1):
        index.search(queries[:1], k, params=search)  # first call pays lazy allocations
        for row in range(len(queries)):
            start = time.perf_counter()
            index.search(queries[row : row + 1], k, params=search)
            times[row] = time.perf_counter() - start
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


@dataclass
class TuneResult:
    params: dict[str, int]
    recall: float  # on the tuning queries
    target_reached: bool
    tried: list[dict[str, Any]] = field(default_factory=list)


def _grid(index: faiss.Index) -> list[list[dict[str, int]]]:
    """Parameter sets, as ladders of growing cost: tuning climbs each ladder until the target is met."""
    index = unwrap(index)
    refine = isinstance(index, faiss.IndexRefine)
    base = unwrap(index.base_index) if refine else index
    factors = K_FACTORS if refine else (1,)
    if isinstance(base, faiss.IndexIVF):
        probes = [p for p in NPROBES if p <= base.nlist]
        return [[{"nprobe": p, **({"k_factor": f} if refine else {})} for p in probes] for f in factors]
    if isinstance(base, faiss.IndexHNSW):
        return [[{"efSearch": e, **({"k_factor": f} if refine else {})} for e in EF_SEARCHES] for f in factors]
    return [[{"k_factor": f} for f in factors]] if refine else [[{}]]


def tune(index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray, *, k: int = 10,
         recall_target: float = 0.95, margin: float = 0.01) -> TuneResult:
    """The cheapest parameters (by single-thread search time over ``queries``) whose recall@k
    reaches ``recall_target + margin`` (the margin absorbs the sampling error between the tuning
    queries and others); else the cheapest reaching the target; else the best recall found."""
    aim = min(1.0, recall_target + margin)
    tried: list[dict[str, Any]] = []
    with faiss_threads(1):
        for ladder in _grid(index):
            previous = -1.0
            for params in ladder:
                start = time.perf_counter()
                _, found = index.search(queries, k, params=search_parameters(index, params))
                seconds = time.perf_counter() - start
                recall = recall_at_k(found, exact_ids, k)
                tried.append({"params": params, "recall": round(recall, 4), "ms_per_query": seconds * 1e3 / len(queries)})
                if recall >= aim:
                    break  # further up this ladder only costs more
                if recall - previous < 0.002:
                    break  # a plateau: this ladder's other knob (k_factor) is the limit
                previous = recall
    reaching = [t for t in tried if t["recall"] >= aim] or [t for t in tried if t["recall"] >= recall_target]
    best = min(reaching, key=lambda t: t["ms_per_query"]) if reaching else max(tried, key=lambda t: t["recall"])
    return TuneResult(dict(best["params"]), best["recall"], bool(reaching), tried)
