"""Search the published index: by product id (similar products), by a new product (image + text
through MOON3.0), or by vector; optionally restricted by the attributes MOON3.0 generated.
Results carry product ids, scores (cosine: inner product of L2-normalised vectors) and titles
joined from the products table.

Attribute filters: when few products match (``exact_filter_limit``), their vectors are read from
product_embeddings at the table version the index was built from and searched exactly, so a
selective filter still returns k results; otherwise the index searches with an id selector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moonpipe import delta
from moonpipe.settings import Settings
from moonpipe.vector_index.store import IndexStore, LoadedIndex
from moonpipe.vector_index.tuning import search_parameters

EXACT_FILTER_LIMIT = 20_000


@dataclass
class SearchHit:
    rank: int
    product_id: str
    score: float
    title: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_strings(values: Sequence[str]) -> str:
    return ", ".join(_sql_string(v) for v in values)


def _select(table: Any, columns: str, where: str) -> pa.Table:
    """A filtered read of a Delta table through delta-rs' query engine (file pruning by stats).
    pyarrow's dataset filters cannot be used here: files that delta-rs MERGE writes hold
    string_view columns, which pyarrow's stats pruning fails to compare with string literals."""
    from deltalake import QueryBuilder

    return pa.table(QueryBuilder().register("t", table).execute(f"SELECT {columns} FROM t WHERE {where}").read_all())


class UnknownProduct(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


class IndexSearcher:
    """Loads (and verifies) one index version, CURRENT by default, and answers searches."""

    def __init__(self, settings: Settings | None = None, version: str | None = None, *, verify: bool = True,
                 exact_filter_limit: int = EXACT_FILTER_LIMIT) -> None:
        self.settings = settings or Settings.from_env()
        self.loaded: LoadedIndex = IndexStore(self.settings.index_uri).load(version, verify=verify)
        self.manifest = self.loaded.manifest
        self.exact_filter_limit = exact_filter_limit
        self._product_ids = self.loaded.id_map.column("product_id")
        self._row_of: dict[str, int] | None = None

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    def _rows(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {pid: row for row, pid in enumerate(self._product_ids.to_pylist())}
        return self._row_of

    # -- vectors ----------------------------------------------------------------------------

    def _embeddings_uri(self) -> str:
        return self.manifest.get("source_table_uri") or self.settings.table_uri("product_embeddings")

    def _stored_vectors(self, product_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Vectors of ``product_ids`` as indexed: product_embeddings at the build's table version."""
        from deltalake import DeltaTable

        table = _select(
            DeltaTable(self._embeddings_uri(), version=self.manifest["source_table_version"]),
            "product_id, embedding",
            f"model_version = {_sql_string(self.model_version)} AND product_id IN ({_sql_strings(product_ids)})",
        )
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                             np.float32).reshape(table.num_rows, -1)
        return table.column("product_id").to_pylist(), vectors

    def vector_of(self, product_id: str) -> np.ndarray:
        if product_id not in self._rows():
            raise UnknownProduct(
                f"product {product_id!r} is not in index version {self.loaded.version} (model {self.model_version}); "
                "it may be new since the build, deleted, or quarantined: check `moonpipe sql` on product_embeddings"
            )
        row = self._rows()[product_id]
        index = faiss.downcast_index(self.loaded.index)
        refine = faiss.downcast_index(index.refine_index) if isinstance(index, faiss.IndexRefine) else None
        if isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)) or isinstance(refine, faiss.IndexFlat):
            return index.reconstruct(row)  # these keep the exact vectors: no table read
        _, vectors = self._stored_vectors([product_id])
        return vectors[0]

    # -- filters ----------------------------------------------------------------------------

    def matching_rows(self, filters: Mapping[str, str]) -> np.ndarray:
        """FAISS ids whose generated attributes equal every filter (case-insensitive)."""
        if "attributes" not in self.loaded.id_map.column_names:
            raise ValueError(f"index version {self.loaded.version} holds no generated attributes to filter on")
        attributes = self.loaded.id_map.column("attributes")
        mask = None
        for key, value in filters.items():
            found = pc.utf8_lower(pc.map_lookup(attributes, key.strip().lower(), "first"))
            cond = pc.fill_null(pc.equal(found, str(value).strip().lower()), False)
            mask = cond if mask is None else pc.and_(mask, cond)
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False)) if mask is not None else np.arange(len(attributes))

    # -- search -----------------------------------------------------------------------------

    def search_vectors(self, vectors: np.ndarray, k: int = 10, *, filters: Mapping[str, str] | None = None,
                       params: Mapping[str, int] | None = None) -> list[list[SearchHit]]:
        """Top-k for each query vector (rows of ``vectors``)."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if queries.shape[1] != self.loaded.index.d:
            raise ValueError(f"query vectors have dimension {queries.shape[1]}, the index {self.loaded.index.d} "
                             f"(model {self.model_version}): embed the query with the same model")
        search = {**self.loaded.params, **(params or {})}
        if filters:
            rows = self.matching_rows(filters)
            if len(rows) == 0:
                return [[] for _ in queries]
            if len(rows) <= self.exact_filter_limit:
                return self._exact_among(queries, rows, k)
            selector = faiss.IDSelectorBatch(rows.astype(np.int64))
            scores, ids = self.loaded.index.search(queries, k, params=search_parameters(self.loaded.index, search, selector))
        else:
            scores, ids = self.loaded.index.search(queries, k, params=search_parameters(self.loaded.index, search))
        return [self._hits(s, i) for s, i in zip(scores, ids)]

    def _exact_among(self, queries: np.ndarray, rows: np.ndarray, k: int) -> list[list[SearchHit]]:
        ids = self._product_ids.take(pa.array(rows)).to_pylist()
        found_ids, vectors = self._stored_vectors(ids)
        row_of = self._rows()
        found_rows = np.array([row_of[p] for p in found_ids], dtype=np.int64)
        scores, positions = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        return [self._hits(s, np.where(p >= 0, found_rows[p], -1)) for s, p in zip(scores, positions)]

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[SearchHit]:
        valid = [(float(s), int(r)) for s, r in zip(scores, rows) if r >= 0]
        if not valid:
            return []
        taken = pa.array([r for _, r in valid], pa.int64())
        pids = self._product_ids.take(taken).to_pylist()
        attrs = (self.loaded.id_map.column("attributes").take(taken).to_pylist()
                 if "attributes" in self.loaded.id_map.column_names else [None] * len(pids))
        titles = self.titles(pids)
        return [SearchHit(rank, pid, round(score, 6), titles.get(pid), dict(attr or []))
                for rank, ((score, _), pid, attr) in enumerate(zip(valid, pids, attrs), start=1)]

    def titles(self, product_ids: Sequence[str]) -> dict[str, str]:
        """Current titles from the products table (missing when the table or the product is)."""
        uri = self.settings.table_uri("products")
        if not product_ids or not delta.exists(uri):
            return {}
        table = _select(delta.open_table(uri), "product_id, title", f"product_id IN ({_sql_strings(product_ids)})")
        return dict(zip(table.column("product_id").to_pylist(), table.column("title").to_pylist()))

    def by_product_id(self, product_id: str, k: int = 10, *, filters: Mapping[str, str] | None = None) -> list[SearchHit]:
        """Products similar to ``product_id`` (itself first: its score is 1)."""
        return self.search_vectors(self.vector_of(product_id), k, filters=filters)[0]

    def by_product(self, title: str | None, image_bytes: bytes | None, *, model_dir: str | None = None,
                   description: str | None = None, category_path: str | None = None,
                   attributes: Mapping[str, str] | None = None, k: int = 10,
                   filters: Mapping[str, str] | None = None) -> list[SearchHit]:
        """Products similar to a product not in the catalog: embedded now with MOON3.0 (the model
        at ``model_dir``, default ``Settings.moon3_model``), which must be the index's model version."""
        from model.moon3_predictor import make_predict_fn
        from model.moon3_processing import ProductInput

        model_dir = model_dir or self.settings.moon3_model
        predict = make_predict_fn(model_dir)
        if predict.model_version != self.model_version:  # type: ignore[attr-defined]
            raise ValueError(
                f"the model at {model_dir} is version {predict.model_version}, the index was built from "  # type: ignore[attr-defined]
                f"{self.model_version}: vectors of different models are not comparable. Pass --model with "
                "that version's checkpoint, or rebuild the index for this model."
            )
        result = predict([ProductInput(title=title, image_bytes=image_bytes, description=description,
                                       category_path=category_path, attributes=dict(attributes or {}))])
        if result.error_codes[0]:
            raise ValueError(f"MOON3.0 cannot embed this product: {result.errors[0]}")
        return self.search_vectors(result.vectors, k, filters=filters)[0]
