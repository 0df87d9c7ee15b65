"""Which FAISS index to build, from the number of vectors, their dimension, a memory budget and a
latency target. The rules, in order (docs/index.md explains them with numbers):

1. **Flat** (exact) while a brute-force scan fits the budget and stays under half the latency target.
2. **HNSW32** for mid-size collections (up to ``hnsw_max_vectors``) when graph + vectors fit the budget:
   no training, and the fastest queries at that size.
3. **IVF{nlist},PQ{m}x4fs,RFlat**: fast-scan PQ over inverted lists finds candidates, the exact
   vectors re-rank them. Fast-scan trains ~30x faster than plain PQ and scans codes in SIMD registers.
4. **IVF{nlist},PQ{m}x4fs,Refine(SQ8)** when the exact vectors do not fit: re-ranking on 8-bit
   scalar-quantised vectors (a quarter of the memory, nearly exact order).
5. **IVF{nlist},PQ{m}x4fs** alone with the most PQ bytes the budget allows, when even SQ8 does not fit.

A budget below what the smallest choice needs is an error naming the minimum.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Single-query brute-force scan speed measured on a 2-core AVX-512 machine (faiss 1.15, one thread):
# 25,000 x 256 floats in 0.6 ms, about 1e7 vector dimensions per millisecond. Taken conservatively.
FLAT_DIMS_PER_MS = 8e6
IVF_ID_BYTES = 8  # an int64 id per vector in the inverted lists
HNSW_LINK_BYTES_PER_M = 2 * 4 * 1.1  # level-0 links (2M ints) plus the upper levels (~10%)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str | int) -> int:
    """Bytes from a human size: ``"2G"``, ``"512M"``, ``"1.5GB"``, ``"300k"`` or an int."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)[iI]?[bB]?\s*", str(text))
    if not match:
        raise ValueError(f"memory size {text!r} not understood: use e.g. '2G', '512M', '1.5GB' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_memory(size: float) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit.lower()]:
            return f"{size / _UNITS[unit.lower()]:.1f}{unit}"
    return f"{int(size)}B"


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string and why it was chosen."""

    factory: str
    family: str  # flat | hnsw | ivf_pq_refine_flat | ivf_pq_refine_sq8 | ivf_pq
    dimension: int
    vector_count: int
    estimated_bytes: int
    nlist: int | None = None
    pq_m: int | None = None
    train_size: int = 0  # vectors needed for training (0: no training)
    reason: str = ""
    alternatives: dict[str, int] = field(default_factory=dict)  # factory -> estimated bytes, all considered

    @property
    def needs_training(self) -> bool:
        return self.train_size > 0

    @property
    def shardable(self) -> bool:
        """Sub-indices of this kind can be built apart and merged (HNSW graphs cannot)."""
        return self.family != "hnsw"


def nlist_for(count: int) -> int:
    """Inverted lists: about sqrt(n), a power of two, with at least 39 training points per list
    (FAISS' minimum for k-means) and at most 65,536. sqrt(n) rather than FAISS' 4-16·sqrt(n) keeps
    k-means and list assignment (the build's cost) 4x cheaper; fast-scan keeps the longer lists
    cheap to scan."""
    target = math.sqrt(max(count, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and count < 39 * nlist:
        nlist //= 2
    return min(nlist, 65536)


def _pq_m(dimension: int, bytes_per_vector: float) -> int | None:
    """Largest even PQ sub-quantizer count dividing ``dimension`` with m/2 bytes (4-bit codes) within
    ``bytes_per_vector``, capped at dimension/4 (finer sub-spaces add little)."""
    best = None
    for m in range(2, dimension // 2 + 1, 2):
        if dimension % m == 0 and m / 2 <= bytes_per_vector and m <= max(2, dimension // 4):
            best = m
    return best


def choose_index(
    vector_count: int,
    dimension: int,
    memory_budget: str | int = "2G",
    latency_target_ms: float = 1.0,
    *,
    hnsw_max_vectors: int = 200_000,
    force: str | None = None,
) -> IndexChoice:
    """The index for ``vector_count`` vectors of ``dimension`` within ``memory_budget`` (the index's
    size in memory when serving). ``force`` takes a factory string as is (its size still checked)."""
    if vector_count <= 0:
        raise ValueError("no vectors to index: run `moonpipe embed` for this model version first")
    if dimension <= 0:
        raise ValueError(f"dimension must be positive, got {dimension}")
    budget = parse_memory(memory_budget)
    n, d = vector_count, dimension
    raw = 4 * d  # float32 vector
    nlist = nlist_for(n)
    centroids = nlist * raw
    # d/4 sub-quantizers (d/8 bytes): the PQ only proposes candidates, the refine ranks them, but
    # coarser codes need many more candidates (k_factor) on noisy clusters for the same recall.
    m_refine = _pq_m(d, d / 8) or _pq_m(d, d)
    train = min(n, max(nlist * 64, 20_000))

    options: list[IndexChoice] = []
    flat_bytes = n * raw
    flat_ms = n * d / FLAT_DIMS_PER_MS
    options.append(IndexChoice("Flat", "flat", d, n, flat_bytes, reason=f"exact scan ~{flat_ms:.2f} ms per query"))
    hnsw_bytes = int(n * (raw + 32 * HNSW_LINK_BYTES_PER_M + 8))
    options.append(IndexChoice("HNSW32", "hnsw", d, n, hnsw_bytes, reason="graph search, no training"))
    if m_refine:
        pq_bytes = n * (m_refine / 2 + IVF_ID_BYTES) + centroids
        options.append(IndexChoice(
            f"IVF{nlist},PQ{m_refine}x4fs,RFlat", "ivf_pq_refine_flat", d, n, int(pq_bytes + n * raw),
            nlist, m_refine, train, "fast-scan PQ candidates re-ranked on exact vectors"))
        options.append(IndexChoice(
            f"IVF{nlist},PQ{m_refine}x4fs,Refine(SQ8)", "ivf_pq_refine_sq8", d, n, int(pq_bytes + n * d),
            nlist, m_refine, train, "fast-scan PQ candidates re-ranked on 8-bit scalar-quantised vectors"))
    per_vector = (budget - centroids) / n - IVF_ID_BYTES
    m_alone = _pq_m(d, per_vector) if per_vector > 0 else None
    if m_alone:
        options.append(IndexChoice(
            f"IVF{nlist},PQ{m_alone}x4fs", "ivf_pq", d, n, int(n * (m_alone / 2 + IVF_ID_BYTES) + centroids),
            nlist, m_alone, train, "fast-scan PQ alone: the most code bytes the budget allows"))
    sizes = {o.factory: o.estimated_bytes for o in options}

    if force:
        forced = next((o for o in options if o.factory == force), None) or _forced(force, d, n, train)
        return IndexChoice(**{**forced.__dict__, "reason": f"forced: {force}", "alternatives": sizes})

    def fits(option: IndexChoice) -> bool:
        return option.estimated_bytes <= budget

    flat, hnsw, *ivf = options
    if fits(flat) and flat_ms <= latency_target_ms / 2:
        picked = flat
    elif n <= hnsw_max_vectors and fits(hnsw):
        picked = hnsw
    else:
        picked = next((o for o in ivf if fits(o)), None)
    if picked is None:
        smallest = min(sizes.values())
        raise ValueError(
            f"memory budget {format_memory(budget)} is too small for {n:,} vectors of dimension {d}: "
            f"the smallest index considered needs {format_memory(smallest)}. Raise --memory-budget."
        )
    return IndexChoice(**{**picked.__dict__, "alternatives": sizes})


def _forced(factory: str, d: int, n: int, train: int) -> IndexChoice:
    """A factory string outside the rule's options (e.g. from an experiment): sized by FAISS itself
    after the build, so its estimate here is the raw vectors'."""
    ivf = re.match(r"IVF(\d+)", factory)
    family = "hnsw" if factory.startswith("HNSW") else "ivf_pq" if ivf else "flat" if factory == "Flat" else "custom"
    return IndexChoice(factory, family, d, n, n * 4 * d,
                       int(ivf.group(1)) if ivf else None, None, train if ivf or "PQ" in factory else 0)
