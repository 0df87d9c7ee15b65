"""The nightly catalog jobs on the real sample snapshots: ingest (GX, quarantine, MERGE, deletions)
and incremental embedding, reruns, a model-version change, planted bad rows, conservation."""

from __future__ import annotations

import io
import json
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.embed import ConservationError as EmbedConservationError
from jobs.embed import check_conservation, embed
from jobs.ingest import ConservationError, SnapshotRejected, ingest
from jobs.sample_catalog import build_sample_snapshots
from model.moon3_checkpoint import build_model, save_checkpoint
from model.moon3_config import Moon3Config
from moonpipe import delta
from moonpipe.settings import Settings

D1 = date(2026, 11, 1)
D2, D3 = D1 + timedelta(days=1), D1 + timedelta(days=2)
FASHION = 40


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Settings:
    settings = Settings.from_env(home=tmp_path_factory.mktemp("catalog-home"))
    build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, D1, days=2, fashion_items=FASHION)
    return settings


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("models")
    first, second = str(root / "v1"), str(root / "v2")
    save_checkpoint(build_model(Moon3Config(seed=0)), first)
    save_checkpoint(build_model(Moon3Config(seed=1)), second)
    return first, second


def _manifest(settings: Settings, day: date) -> dict:
    return json.loads(Path(settings.snapshot_uri(day.isoformat()), "_churn.json").read_text())


def _products(spark, settings: Settings) -> dict:
    return {r.product_id: r for r in delta.read(spark, settings.table_uri("products")).collect()}


@pytest.fixture(scope="module")
def day1(spark, home, models):
    return ingest(D1, home, spark), embed(D1, models[0], home, spark)


@pytest.fixture(scope="module")
def day2(spark, home, models, day1):
    return ingest(D2, home, spark), embed(D2, models[0], home, spark)


def test_day1_ingests_and_embeds_every_product(spark, home, day1):
    ingested, embedded = day1
    assert (ingested.rows_in, ingested.rows_valid, ingested.rows_quarantined) == (54 + FASHION, 54 + FASHION, 0)
    assert ingested.inserted == 54 + FASHION and ingested.deleted == 0
    assert (embedded.live_products, embedded.to_embed, embedded.embedded, embedded.quarantined) == (94, 94, 94, 0)
    vectors = delta.read(spark, home.table_uri("product_embeddings")).collect()
    assert len(vectors) == 94 and {v.embedding_dim for v in vectors} == {128}
    assert all(abs(sum(x * x for x in v.embedding) - 1) < 1e-4 for v in vectors)
    assert Path(ingested.data_docs).is_file()


def test_day2_embeds_only_new_and_changed_products_and_records_deletions(spark, home, day2):
    ingested, embedded = day2
    manifest = _manifest(home, D2)
    content_changed = {pid for pid, fields in manifest["changed"].items() if set(fields) - {"price"}}
    assert ingested.inserted == len(manifest["added"])
    assert ingested.updated == len(manifest["changed"])  # price-only changes update the row too
    assert ingested.deleted == len(manifest["deleted"])
    assert embedded.to_embed == len(manifest["added"]) + len(content_changed)
    assert embedded.skipped_unchanged == embedded.live_products - embedded.to_embed
    assert embedded.removed_deleted == len(manifest["deleted"])  # search never serves deleted products
    products = _products(spark, home)
    for pid in manifest["deleted"]:
        assert products[pid].is_deleted and products[pid].deleted_date == D2
    for pid in manifest["added"]:
        assert products[pid].first_seen_date == D2 and not products[pid].is_deleted
    changed = next(iter(content_changed))
    assert products[changed].first_seen_date == D1 and products[changed].last_changed_date == D2
    fresh = {r.product_id: r for r in delta.read(spark, home.table_uri("product_embeddings")).collect()}
    assert fresh[changed].snapshot_date == D2 and fresh[changed].content_hash == products[changed].content_hash


def test_rerunning_a_date_changes_nothing(spark, home, models, day2):
    products_before = sorted(delta.read(spark, home.table_uri("products")).collect())
    vectors_before = sorted(delta.read(spark, home.table_uri("product_embeddings")).collect())
    again = ingest(D2, home, spark)
    embedded = embed(D2, models[0], home, spark)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert embedded.to_embed == 0
    assert sorted(delta.read(spark, home.table_uri("products")).collect()) == products_before
    assert sorted(delta.read(spark, home.table_uri("product_embeddings")).collect()) == vectors_before


def test_a_new_model_version_reembeds_every_live_product(spark, home, models, day2):
    summary = embed(D2, models[1], home, spark)
    assert summary.to_embed == summary.live_products == summary.embedded
    versions = delta.read(spark, home.table_uri("product_embeddings")).groupBy("model_version").count().collect()
    assert {r["count"] for r in versions} == {summary.live_products}  # both versions complete


def test_staged_and_driver_merge_sources_write_the_same_vectors(spark, home, models, day2, monkeypatch):
    """A churn-sized result is merged from the driver; a larger one is staged by Spark: same rows."""
    import jobs.embed as embed_job

    def vectors() -> list:
        rows = delta.read(spark, home.table_uri("product_embeddings")).drop("embedded_at").collect()
        return sorted(rows, key=lambda r: (r.product_id, r.model_version))

    driver = embed(D2, models[0], home, spark, full=True)
    assert driver.to_embed <= embed_job.DRIVER_MERGE_ROWS
    before = vectors()
    monkeypatch.setattr(embed_job, "DRIVER_MERGE_ROWS", 0)
    staged = embed(D2, models[0], home, spark, full=True)
    assert staged.embedded == driver.embedded == driver.live_products
    assert staged.embeddings_version == driver.embeddings_version + 1
    assert vectors() == before


def _image(color: str, size: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, "JPEG")
    return out.getvalue()


def test_planted_bad_rows_are_quarantined_with_their_reasons(spark, home, models, day2):
    base = pq.read_table(Path(home.snapshot_uri(D2.isoformat())) / "catalog.parquet")
    rows = base.to_pylist()
    good = rows[0]
    existing = rows[1]  # a known product whose row arrives broken today
    rows[1] = {**existing, "price": -5.0}
    planted = [
        {**good, "product_id": "BAD-CORRUPT", "image_bytes": b"\xff\xd8\xff\xe0 broken jpeg"},
        {**good, "product_id": None},
        {**good, "product_id": "BAD-DUP", "image_bytes": _image("red")},
        {**good, "product_id": "BAD-DUP", "image_bytes": _image("blue")},
        {**good, "product_id": "BAD-TITLE", "title": "   "},
        {**good, "product_id": "BAD-HUGE", "title": "Dress " * 200},
    ]
    rows = rows + planted
    folder = Path(home.snapshot_uri(D3.isoformat()))
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=base.schema), folder / "catalog.parquet")

    summary = ingest(D3, home, spark)
    assert summary.rows_in == base.num_rows + 6 and summary.rows_quarantined == 7
    assert summary.rows_valid + summary.rows_quarantined == summary.rows_in
    quarantined = (
        delta.read(spark, home.table_uri("quarantine")).where(f"stage = 'ingest' AND snapshot_date = '{D3}'").collect()
    )
    by_id = {}
    for row in quarantined:
        by_id.setdefault(row.product_id, []).append(row.reason_code)
    assert by_id == {
        "BAD-CORRUPT": ["image_undecodable"],
        None: ["missing_id"],
        "BAD-DUP": ["duplicate_id", "duplicate_id"],
        existing["product_id"]: ["negative_price"],
        "BAD-TITLE": ["empty_title"],
        "BAD-HUGE": ["title_too_long"],
    }
    corrupt = next(r for r in quarantined if r.product_id == "BAD-CORRUPT")
    assert corrupt.raw_image.startswith(b"\xff\xd8") and json.loads(corrupt.raw_row)["title"] == good["title"]
    products = _products(spark, home)
    assert not any(pid.startswith("BAD-") for pid in products)
    # A product whose row was quarantined is still in the snapshot: kept as it was, not flagged deleted.
    assert not products[existing["product_id"]].is_deleted
    assert products[existing["product_id"]].price == existing["price"]
    rerun = ingest(D3, home, spark)  # a rerun replaces the date's quarantine rows: no duplicates
    assert rerun.rows_quarantined == 7
    assert delta.read(spark, home.table_uri("quarantine")).where(f"stage = 'ingest' AND snapshot_date = '{D3}'").count() == 7


def test_a_collapsed_snapshot_stops_the_run_and_writes_nothing(spark, home, day2):
    base = pq.read_table(Path(home.snapshot_uri(D2.isoformat())) / "catalog.parquet")
    day = D1 + timedelta(days=20)
    folder = Path(home.snapshot_uri(day.isoformat()))
    folder.mkdir(parents=True)
    pq.write_table(base.slice(0, 10), folder / "catalog.parquet")
    versions = [delta.version(home.table_uri(t)) for t in ("products", "quarantine")]
    with pytest.raises(SnapshotRejected, match=r"10 rows.*previous"):
        ingest(day, home, spark)
    assert [delta.version(home.table_uri(t)) for t in ("products", "quarantine")] == versions


def test_the_conservation_checks_fail_loudly(spark, home, models, day2, monkeypatch):
    from deltalake import DeltaTable

    import jobs.ingest as ingest_module

    real_source = ingest_module._products_source
    monkeypatch.setattr(ingest_module, "_products_source", lambda valid, day: real_source(valid, day).limit(5))
    products_version = delta.version(home.table_uri("products"))
    with pytest.raises(ConservationError, match="rows in, but .* nothing was written"):
        ingest(D3, home, spark)
    assert delta.version(home.table_uri("products")) == products_version
    monkeypatch.undo()

    from jobs.embed import EmbedSummary, model_version

    version = model_version(models[0])
    embed(D3, models[0], home, spark)  # up to date with the latest snapshot first
    vectors = delta.read(spark, home.table_uri("product_embeddings")).where(f"model_version = '{version}'")
    victim = vectors.first().product_id
    DeltaTable(home.table_uri("product_embeddings")).delete(f"product_id = '{victim}' AND model_version = '{version}'")
    with pytest.raises(EmbedConservationError, match=victim):
        check_conservation(spark, home, version, D3, EmbedSummary(D3.isoformat(), version, False))
    healed = embed(D3, models[0], home, spark)  # the next run embeds it again
    assert healed.to_embed == healed.embedded == 1


def test_json_lines_snapshot_with_image_files(spark, tmp_path):
    settings = Settings.from_env(home=tmp_path / "home")
    folder = Path(settings.snapshot_uri(D1.isoformat()))
    (folder / "images").mkdir(parents=True)
    lines = []
    for index, color in enumerate(("red", "green", "blue")):
        (folder / "images" / f"p{index}.jpg").write_bytes(_image(color))
        lines.append({"product_id": f"P{index}", "title": f"{color} mug", "category_path": "Home > Kitchen",
                      "attributes": {"color": color}, "price": 9.5, "currency": "USD",
                      "image_uri": f"images/p{index}.jpg", "source": "jsonl-feed"})
    lines.append({**lines[0], "product_id": "P9", "image_uri": "images/missing.jpg"})
    (folder / "catalog.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    summary = ingest(D1, settings, spark)
    assert (summary.rows_in, summary.rows_valid, summary.rows_quarantined) == (4, 3, 1)
    assert summary.quarantine_reasons == {"image_missing": 1}
    products = _products(spark, settings)
    assert sorted(products) == ["P0", "P1", "P2"]
    assert products["P1"].image_bytes == (folder / "images" / "p1.jpg").read_bytes()
    assert products["P2"].attributes == {"color": "blue"}


def test_a_run_killed_midway_completes_on_rerun_without_duplicates(spark, tmp_path, models, monkeypatch):
    import jobs.embed as embed_module
    import jobs.ingest as ingest_module

    settings = Settings.from_env(home=tmp_path / "home")
    build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, D1, days=1, fashion_items=10)

    def killed(*args, **kwargs):
        raise RuntimeError("worker lost (simulated crash)")

    monkeypatch.setattr(ingest_module.delta, "merge", killed)  # dies after writing quarantine
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(D1, settings, spark)
    monkeypatch.undo()
    ingested = ingest(D1, settings, spark)
    assert ingested.inserted == ingested.rows_valid == 64

    monkeypatch.setattr(embed_module.delta, "merge", killed)  # dies after the model ran
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(D1, models[0], settings, spark)
    monkeypatch.undo()
    embedded = embed(D1, models[0], settings, spark)
    assert embedded.to_embed == embedded.embedded == 64
    vectors = delta.read(spark, settings.table_uri("product_embeddings"))
    assert vectors.count() == vectors.select("product_id").distinct().count() == 64


def test_a_product_the_model_cannot_read_is_quarantined_by_embed(spark, tmp_path, models):
    """A product that passed ingest but whose stored image cannot be decoded (damaged at rest) is
    quarantined by embed with its reason and raw bytes; the rest of the run is embedded; a rerun of
    the date replaces the quarantine instead of adding to it."""
    from pyspark.sql import functions as F

    from schemas.tables import PRODUCTS

    settings = Settings.from_env(home=tmp_path / "home")
    build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, D1, days=1, fashion_items=10)
    ingest(D1, settings, spark)
    assert embed(D1, models[0], settings, spark).embedded == 64
    uri = settings.table_uri(PRODUCTS.name)
    damaged_id, edited_id = [r.product_id for r in delta.read(spark, uri).orderBy("product_id").limit(2).collect()]
    garbage = b"\xff\xd8\xff\xe0 not a jpeg"
    changes = (
        delta.read(spark, uri).where(F.col("product_id").isin(damaged_id, edited_id))
        .withColumn("image_bytes", F.when(F.col("product_id") == damaged_id, F.lit(garbage)).otherwise(F.col("image_bytes")))
        .withColumn("title", F.concat("title", F.lit(" (new season)")))
        .withColumn("content_hash", F.sha2(F.concat("content_hash", F.lit("x")), 256))
    )
    delta.merge(changes, uri, PRODUCTS)

    def embed_quarantine() -> list:
        rows = delta.read(spark, settings.table_uri("quarantine")).where("stage = 'embed'").collect()
        return [(r.product_id, r.reason_code, r.snapshot_date, r.raw_image) for r in rows]

    summary = embed(D1, models[0], settings, spark)
    assert (summary.to_embed, summary.embedded, summary.quarantined) == (2, 1, 1)
    assert summary.quarantine_reasons == {"image_undecodable": 1}
    assert embed_quarantine() == [(damaged_id, "image_undecodable", D1, garbage)]
    edited = delta.read(spark, settings.table_uri("product_embeddings")).where(F.col("product_id") == edited_id).first()
    assert edited.content_hash == _products(spark, settings)[edited_id].content_hash

    rerun = embed(D1, models[0], settings, spark)  # the damaged product is still there to embed
    assert (rerun.to_embed, rerun.embedded, rerun.quarantined) == (1, 0, 1)
    assert embed_quarantine() == [(damaged_id, "image_undecodable", D1, garbage)]
