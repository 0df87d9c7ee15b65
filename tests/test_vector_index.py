"""The FAISS index: the choice by size and budget, a build from a real Delta table with recall
measured against exact search and recorded, atomic publishing (failures leave the old version
serving), corrupt files caught on load, retention, quarantined rows, attribute filters.

Vectors here are small synthetic clusters written into a real product_embeddings Delta table:
cluster structure makes "similar" well defined (tests on the real sample data and MOON3.0 are in
test_vector_index_catalog.py)."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from jobs.build_index import RecallBelowTarget, build_index
from moonpipe import delta
from moonpipe.settings import Settings
from moonpipe.vector_index.choice import choose_index, parse_memory
from moonpipe.vector_index.search import IndexSearcher, UnknownProduct
from moonpipe.vector_index.store import CURRENT, IndexCorrupt, IndexStore
from schemas.tables import PRODUCT_EMBEDDINGS

MODEL = "m-test"
COLORS = ("red", "green", "blue", "black", "white")


def clustered(count: int, dim: int, clusters: int, seed: int = 0, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, count)
    points = centres[labels] + noise * rng.normal(size=(count, dim)).astype(np.float32)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32), labels


def embeddings_table(vectors: np.ndarray, labels: np.ndarray, model: str = MODEL, prefix: str = "p") -> pa.Table:
    count, dim = vectors.shape
    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist([{
        "product_id": f"{prefix}{i:06d}", "model_version": model, "content_hash": f"h{i}",
        "embedding": vectors[i].tolist(), "embedding_dim": dim,
        "attributes": [("color", COLORS[labels[i] % len(COLORS)]), ("cluster", str(labels[i]))],
        "reasoning": None, "snapshot_date": date(2026, 11, 1), "embedded_at": now,
    } for i in range(count)], schema=PRODUCT_EMBEDDINGS.arrow_schema())


def lake(tmp_path: Path, table: pa.Table) -> Settings:
    settings = Settings.from_env(home=tmp_path / "home")
    delta.write(table, settings.table_uri("product_embeddings"), PRODUCT_EMBEDDINGS)
    return settings


def index_versions(settings: Settings) -> dict[str, dict]:
    rows = delta.read_arrow(settings.table_uri("index_versions")).to_pylist()
    return {r["index_version"]: r for r in rows}


@pytest.fixture(scope="module")
def flat_home(tmp_path_factory) -> tuple[Settings, np.ndarray, np.ndarray]:
    vectors, labels = clustered(3000, 32, 30)
    return lake(tmp_path_factory.mktemp("flat"), embeddings_table(vectors, labels)), vectors, labels


@pytest.fixture(scope="module")
def published(flat_home):
    settings, _, _ = flat_home
    return build_index(settings, model_version=MODEL, queries=200)


# -- the choice -----------------------------------------------------------------------------------


def test_memory_sizes_parse_and_bad_ones_say_how():
    assert parse_memory("2G") == 2 << 30 and parse_memory("512M") == 512 << 20 and parse_memory("1.5GB") == 3 << 29
    with pytest.raises(ValueError, match="use e.g. '2G'"):
        parse_memory("lots")


def test_the_index_type_changes_with_size_and_budget():
    assert choose_index(5_000, 128, "2G").factory == "Flat"  # brute force is under half the latency target
    assert choose_index(5_000, 128, "2G", latency_target_ms=0.05).factory == "HNSW32"  # unless the target is tight
    assert choose_index(100_000, 256, "2G").factory == "HNSW32"
    assert choose_index(100_000, 256, "100M").factory == "IVF256,PQ64x4fs,Refine(SQ8)"  # graph + vectors do not fit
    big = choose_index(1_000_000, 256, "2G")
    assert (big.factory, big.family) == ("IVF1024,PQ64x4fs,RFlat", "ivf_pq_refine_flat")
    assert big.estimated_bytes <= parse_memory("2G") < big.alternatives["HNSW32"] + big.estimated_bytes
    assert choose_index(1_000_000, 256, "512M").factory == "IVF1024,PQ64x4fs,Refine(SQ8)"
    small = choose_index(1_000_000, 256, "64M")
    assert small.factory == "IVF1024,PQ64x4fs" and small.estimated_bytes <= parse_memory("64M")
    with pytest.raises(ValueError, match="too small for 1,000,000 vectors.*Raise --memory-budget"):
        choose_index(1_000_000, 256, "4M")
    with pytest.raises(ValueError, match="run `moonpipe embed`"):
        choose_index(0, 256)


# -- build, record, search ------------------------------------------------------------------------


def test_a_build_is_measured_recorded_and_made_current(flat_home, published):
    settings, vectors, _ = flat_home
    summary = published
    assert summary.status == "published" and summary.index_type == "Flat"
    assert (summary.vector_count, summary.dimension, summary.rejected_rows) == (3000, 32, 0)
    assert summary.recall_at_10 == 1.0 and 0 < summary.latency_p50_ms <= summary.latency_p99_ms
    store = IndexStore(settings.index_uri)
    assert store.current() == summary.index_version
    manifest = store.manifest(summary.index_version)
    assert manifest["source_table_version"] == delta.version(settings.table_uri("product_embeddings"))
    assert manifest["vector_count"] == 3000 and manifest["recall_at_10"] == 1.0
    assert set(manifest["files"]) == {"index.faiss", "id_map.parquet"}
    row = index_versions(settings)[summary.index_version]
    assert (row["status"], row["index_type"], row["vector_count"], row["recall_at_10"]) == ("published", "Flat", 3000, 1.0)
    assert json.dumps(summary.as_dict())  # what Airflow pushes to XCom


def test_search_by_product_id_returns_itself_then_its_cluster(flat_home, published):
    settings, vectors, labels = flat_home
    searcher = IndexSearcher(settings)
    hits = searcher.by_product_id("p000007", k=10)
    assert hits[0].product_id == "p000007" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits] == list(range(1, 11))
    assert {labels[int(h.product_id[1:])] for h in hits} == {labels[7]}  # its cluster next
    # the same as exact search over all vectors
    _, exact = faiss.knn(vectors[7:8], vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert [h.product_id for h in hits] == [f"p{i:06d}" for i in exact[0]]
    with pytest.raises(UnknownProduct, match="'nope' is not in index version"):
        searcher.by_product_id("nope")


def test_attribute_filters_restrict_results(flat_home, published):
    settings, vectors, labels = flat_home
    searcher = IndexSearcher(settings)
    hits = searcher.search_vectors(vectors[7], k=10, filters={"color": "BLUE"})[0]
    assert len(hits) == 10 and all(h.attributes["color"] == "blue" for h in hits)
    blue = np.flatnonzero(np.array([COLORS[c % 5] for c in labels]) == "blue")
    _, exact = faiss.knn(vectors[7:8], vectors[blue], 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert [h.product_id for h in hits] == [f"p{blue[i]:06d}" for i in exact[0]]
    # the index's own selector path (large allowed sets) gives the same answer here
    searcher.exact_filter_limit = 0
    assert [h.product_id for h in searcher.search_vectors(vectors[7], k=10, filters={"color": "blue"})[0]] == \
        [h.product_id for h in hits]
    assert searcher.search_vectors(vectors[7], k=10, filters={"color": "purple"}) == [[]]
    with pytest.raises(ValueError, match="dimension 16, the index 32"):
        searcher.search_vectors(np.ones(16, np.float32))


def test_an_ivf_index_is_tuned_to_the_recall_target(tmp_path):
    vectors, labels = clustered(20_000, 64, 100, seed=1)
    settings = lake(tmp_path, embeddings_table(vectors, labels))
    summary = build_index(settings, model_version=MODEL, force_index="IVF128,PQ16x4fs,RFlat", queries=400)
    assert summary.index_type == "IVF128,PQ16x4fs,RFlat" and set(summary.index_params) == {"nprobe", "k_factor"}
    assert summary.recall_at_10 >= 0.95
    # Recall re-measured independently on fresh queries with the recorded parameters.
    fresh = clustered(20_300, 64, 100, seed=1)[0][20_000:]  # same centres (same seed), points not indexed
    searcher = IndexSearcher(settings)
    found = [[int(h.product_id[1:]) for h in hits] for hits in searcher.search_vectors(fresh, k=10)]
    _, exact = faiss.knn(fresh, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.93
    assert index_versions(settings)[summary.index_version]["recall_at_10"] == summary.recall_at_10


# -- publishing --------------------------------------------------------------------------------------


def test_a_failure_mid_publish_leaves_the_old_version_current(flat_home, published, monkeypatch):
    settings, _, _ = flat_home
    store = IndexStore(settings.index_uri)
    before = store.current()
    assert before == published.index_version
    # 1. crash after the new version is written and verified, before CURRENT moves
    with pytest.raises(RuntimeError, match="injected failure"):
        build_index(settings, model_version=MODEL, queries=50, fail_after_write=True)
    assert store.current() == before
    # 2. crash while writing the version's files: its partial folder is removed
    import moonpipe.vector_index.store as store_module

    def broken_write(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(store_module.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        build_index(settings, model_version=MODEL, queries=50)
    monkeypatch.undo()
    assert store.current() == before
    assert not [p for p in Path(settings.index_uri).iterdir() if p.name.endswith(".partial")]
    failed = [r for r in index_versions(settings).values() if r["status"] == "failed"]
    assert len(failed) >= 2 and any("disk full" in r["error"] for r in failed)
    assert IndexSearcher(settings).loaded.version == before  # still serving


def test_a_corrupt_index_file_is_detected_on_load(tmp_path):
    vectors, labels = clustered(500, 16, 5)
    settings = lake(tmp_path, embeddings_table(vectors, labels))
    summary = build_index(settings, model_version=MODEL, queries=50)
    index_file = Path(summary.index_uri) / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match=r"index.faiss: sha256 .* does not match .*moonpipe index use"):
        IndexSearcher(settings)
    index_file.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(IndexCorrupt, match="corrupt"):
        IndexStore(settings.index_uri).load()
    (Path(settings.index_uri) / CURRENT).unlink()
    with pytest.raises(FileNotFoundError, match="run `moonpipe index build` first"):
        IndexStore(settings.index_uri).load()


def test_retention_keeps_the_newest_versions_and_records_retired_ones(tmp_path):
    vectors, labels = clustered(300, 16, 5)
    settings = lake(tmp_path, embeddings_table(vectors, labels))
    builds = [build_index(settings, model_version=MODEL, queries=20, retain=2) for _ in range(4)]
    store = IndexStore(settings.index_uri)
    assert store.versions() == [b.index_version for b in builds[2:]]
    assert store.current() == builds[-1].index_version
    statuses = {v: r["status"] for v, r in index_versions(settings).items()}
    assert statuses == {builds[0].index_version: "retired", builds[1].index_version: "retired",
                        builds[2].index_version: "published", builds[3].index_version: "published"}


def test_bad_rows_are_quarantined_with_their_reason_and_reruns_do_not_duplicate(tmp_path):
    vectors, labels = clustered(400, 16, 4)
    table = embeddings_table(vectors, labels).to_pylist()
    table[3]["embedding"] = [0.5] * 8  # wrong length
    table[4]["embedding"] = [float("nan")] + [0.1] * 15
    table[5]["embedding"] = [0.0] * 16
    settings = lake(tmp_path, pa.Table.from_pylist(table, schema=PRODUCT_EMBEDDINGS.arrow_schema()))
    for _ in range(2):
        summary = build_index(settings, model_version=MODEL, queries=40)
        assert summary.vector_count == 397 and summary.rejected_rows == 3
        assert summary.rejected_reasons == {"wrong_dimension": 1, "non_finite": 1, "zero_vector": 1}
    rows = delta.read_arrow(settings.table_uri("quarantine"), filters=[("stage", "=", "index")]).to_pylist()
    assert sorted((r["product_id"], r["reason_code"]) for r in rows) == [
        ("p000003", "wrong_dimension"), ("p000004", "non_finite"), ("p000005", "zero_vector")]
    ids = set(IndexStore(settings.index_uri).load().id_map.column("product_id").to_pylist())
    assert len(ids) == 397 and not ids & {"p000003", "p000004", "p000005"}


def test_a_build_below_the_recall_target_is_not_published(flat_home, published):
    settings, _, _ = flat_home
    before = IndexStore(settings.index_uri).current()
    with pytest.raises(RecallBelowTarget, match="< target 0.999"):
        build_index(settings, model_version=MODEL, queries=100, force_index="IVF16,PQ4x4fs", recall_target=0.999)
    assert IndexStore(settings.index_uri).current() == before


def test_unknown_model_versions_and_options_are_named(flat_home):
    settings, _, _ = flat_home
    with pytest.raises(ValueError, match="no rows for model version 'other'.*versions present: \\['m-test'\\]"):
        build_index(settings, model_version="other")
    with pytest.raises(TypeError, match="memory_budgt"):
        build_index(settings, model_version=MODEL, memory_budgt="1G")
