"""Where the vectors come from, batch by batch, so memory stays bounded by the batch size.

``DeltaEmbeddings`` streams one model version of ``product_embeddings`` at a fixed table version
(the one recorded with the index); ``NpyVectors`` streams a ``.npy`` file (benchmarks). Rows the
index cannot take (wrong length, NaN/inf, a zero vector) come out as ``RejectedRow``s with a
reason, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moonpipe import delta

DEFAULT_BATCH_ROWS = 65_536


@dataclass
class VectorBatch:
    """Valid rows: ids, float32 vectors [n, d], and the generated attributes (an Arrow map array or None)."""

    product_ids: list[str]
    vectors: np.ndarray
    attributes: pa.Array | None = None

    def __len__(self) -> int:
        return len(self.product_ids)


@dataclass(frozen=True)
class RejectedRow:
    product_id: str
    reason_code: str
    reason: str
    snapshot_date: object = None  # the embedding row's snapshot date, for its quarantine partition


class VectorSource(Protocol):
    description: str
    dimension: int
    row_count: int  # rows before validation

    def batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[VectorBatch, list[RejectedRow]]]: ...


def split_valid(batch: pa.RecordBatch | pa.Table, dimension: int) -> tuple[VectorBatch, list[RejectedRow]]:
    """Valid rows of an Arrow batch with ``product_id`` and ``embedding`` (list<float32>) columns,
    and the rejected ones with their reason."""
    ids = batch.column("product_id").to_pylist()
    embeddings = batch.column("embedding")
    if isinstance(embeddings, pa.ChunkedArray):
        embeddings = embeddings.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(embeddings), -1).to_numpy(zero_copy_only=False)
    dates = batch.column("snapshot_date").to_pylist() if "snapshot_date" in batch.schema.names else [None] * len(ids)
    rejected: list[RejectedRow] = []
    good = lengths == dimension
    for row in np.flatnonzero(~good):
        if lengths[row] < 0:
            rejected.append(RejectedRow(ids[row], "missing_embedding", "embedding is null", dates[row]))
        else:
            rejected.append(RejectedRow(
                ids[row], "wrong_dimension",
                f"embedding has {lengths[row]} values, the index dimension is {dimension}", dates[row]))
    kept = pa.array(good)
    valid = pc.filter(embeddings, kept)
    vectors = (
        np.asarray(valid.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dimension)
        if len(valid) else np.empty((0, dimension), np.float32)
    )
    kept_rows = np.flatnonzero(good)
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.empty(0)
    finite = np.isfinite(vectors).all(axis=1) & np.isfinite(norms)
    nonzero = norms > 1e-12
    ok = finite & nonzero
    for position in np.flatnonzero(~ok):
        row = kept_rows[position]
        code, reason = ("non_finite", "embedding holds NaN or infinity") if not finite[position] else (
            "zero_vector", "embedding is all zeros: no direction to search by")
        rejected.append(RejectedRow(ids[row], code, reason, dates[row]))
    rows = kept_rows[ok]
    attributes = None
    if "attributes" in batch.schema.names:
        attributes = pc.take(batch.column("attributes"), pa.array(rows, pa.int64()))
        if isinstance(attributes, pa.ChunkedArray):
            attributes = attributes.combine_chunks()
    return VectorBatch([ids[i] for i in rows], np.ascontiguousarray(vectors[ok]), attributes), rejected


class DeltaEmbeddings:
    """One model version of ``product_embeddings`` at one Delta version, streamed in batches."""

    COLUMNS = ("product_id", "embedding", "attributes", "snapshot_date")

    def __init__(self, table_uri: str, model_version: str, table_version: int | None = None) -> None:
        table = delta.open_table(table_uri, version=table_version)
        self.table_uri = table_uri
        self.model_version = model_version
        self.table_version = table.version()
        self._dataset = table.to_pyarrow_dataset(partitions=[("model_version", "=", model_version)])
        dims = self._dataset.to_table(columns=["embedding_dim"]).column("embedding_dim")
        self.row_count = len(dims)
        if self.row_count == 0:
            versions = sorted(set(delta.read_arrow(table_uri, version=self.table_version, columns=["model_version"])
                                  .column("model_version").to_pylist()))
            raise ValueError(
                f"product_embeddings (version {self.table_version}) has no rows for model version {model_version!r}; "
                f"versions present: {versions or 'none'}. Run `moonpipe embed` with that model first."
            )
        # The dimension of the version is its most common one; rows of another length are rejected.
        counts = pc.value_counts(pc.drop_null(dims)).to_pylist()
        self.dimension = int(max(counts, key=lambda c: c["counts"])["values"])
        self.description = f"{table_uri}@v{self.table_version} model_version={model_version}"

    def batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[VectorBatch, list[RejectedRow]]]:
        for batch in self._dataset.to_batches(columns=list(self.COLUMNS), batch_size=batch_rows):
            if batch.num_rows:
                yield split_valid(batch, self.dimension)


class NpyVectors:
    """Vectors of a ``.npy`` file (float32, 2-D) read in slices from disk; ids are the row numbers.
    Slices are read, not memory-mapped, so pages already indexed do not stay in the process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        header = np.load(self.path, mmap_mode="r")  # only the header is read
        if header.ndim != 2 or not header.flags.c_contiguous or header.dtype != np.float32:
            raise ValueError(f"{self.path}: need a C-ordered 2-D float32 array, got {header.dtype} {header.shape}")
        self.row_count, self.dimension = header.shape
        self._offset = header.offset
        del header
        self.description = str(self.path)

    def read(self, start: int, stop: int) -> np.ndarray:
        with self.path.open("rb") as handle:
            handle.seek(self._offset + start * self.dimension * 4)
            return np.fromfile(handle, np.float32, (stop - start) * self.dimension).reshape(-1, self.dimension)

    def batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[VectorBatch, list[RejectedRow]]]:
        for start in range(0, self.row_count, batch_rows):
            stop = min(start + batch_rows, self.row_count)
            yield VectorBatch([str(i) for i in range(start, stop)], self.read(start, stop)), []
