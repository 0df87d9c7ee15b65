"""The sample-snapshot builder: contract, real content, churn ground truth, determinism, reuse, errors.

The churn manifest is checked against a diff computed here, independently, from consecutive snapshots.
Needs the raw sample data that `make setup` installs (Vendure's CSV and photos, Fashion-MNIST).
"""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import sample_catalog
from jobs.sample_catalog import CHURN, SnapshotInfo, build_sample_snapshots
from jobs.sample_sources import FASHION_CLASSES, SampleDataMissing, load_fashion_mnist, read_idx
from moonpipe.settings import Settings
from schemas.tables import CATALOG_SNAPSHOT

RAW = Path(Settings.from_env().raw_data_dir)
START = datetime.date(2024, 3, 1)
DAYS = 3
FASHION = 40
VENDURE_PRODUCTS = 54

def _dates() -> list[datetime.date]:
    return [START + datetime.timedelta(days=i) for i in range(DAYS)]


def _folder(root: Path, day: datetime.date) -> Path:
    return root / f"dt={day.isoformat()}"


def _rows(root: Path, day: datetime.date) -> dict[str, dict]:
    rows = pq.read_table(_folder(root, day) / "catalog.parquet").to_pylist()
    return {r["product_id"]: {**r, "attributes": dict(r["attributes"])} for r in rows}


def _manifest(root: Path, day: datetime.date) -> dict:
    return json.loads((_folder(root, day) / "_churn.json").read_text())


def _csv_variants() -> list[dict]:
    """Vendure's CSV, parsed here independently: one dict per variant with its product's name."""
    with (RAW / "vendure" / "products.csv").open(newline="", encoding="utf-8") as handle:
        rows = [{k.strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(handle)]
    variants, name, seen = [], None, set()
    for row in rows:
        name = row["name"] or name
        values = [v.strip() for v in row["optionValues"].split("|")] if row["optionValues"] else []
        # A repeated sku (Modern Cafe Chair) becomes "<sku>-<option values>" as a product id.
        product_id = row["sku"] if row["sku"] not in seen else "-".join([row["sku"], *values]).lower().replace(" ", "-")
        seen.add(row["sku"])
        variants.append({"name": name, "first": bool(row["name"]), "id": product_id, "sku": row["sku"],
                         "price": float(row["price"]), "values": values})
    return variants


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SnapshotInfo]]:
    root = tmp_path_factory.mktemp("snapshots")
    infos = build_sample_snapshots(str(root), str(RAW), START, days=DAYS, fashion_items=FASHION, seed=7)
    return root, infos


def test_returns_one_info_per_day_and_writes_data_manifest_and_ready_marker(built):
    root, infos = built
    assert [i.date for i in infos] == _dates()
    assert [i.reused for i in infos] == [False] * DAYS
    for info in infos:
        assert Path(info.uri) == _folder(root, info.date)
        assert sorted(p.name for p in Path(info.uri).iterdir()) == ["_SUCCESS", "_churn.json", "catalog.parquet"]


def test_every_day_conforms_to_the_contract(built):
    root, infos = built
    for info in infos:
        table = pq.read_table(_folder(root, info.date) / "catalog.parquet")
        CATALOG_SNAPSHOT.check_batch(table)
        assert table.column_names == CATALOG_SNAPSHOT.column_names
        assert table.num_rows == info.rows
        rows = table.to_pylist()
        ids = [r["product_id"] for r in rows]
        assert ids == sorted(set(ids)), "ids unique and sorted"
        assert all(r["title"] and r["description"] and r["category_path"] for r in rows)
        assert all(r["price"] > 0 and r["currency"] == "USD" for r in rows)
        assert all(r["image_uri"] is None and r["image_bytes"] for r in rows)
        assert {r["source"] for r in rows} == {"vendure", "fashion-mnist"}
        assert all(r["updated_at"].tzinfo is not None for r in rows)
        # Nothing updated after the end of the snapshot's day.
        end = datetime.datetime.combine(info.date + datetime.timedelta(days=1), datetime.time(), datetime.timezone.utc)
        assert max(r["updated_at"] for r in rows) < end


def test_day_one_holds_every_vendure_product_and_the_fashion_items(built):
    root, infos = built
    rows = _rows(root, START)
    first_skus = {v["sku"] for v in _csv_variants() if v["first"]}
    vendure = {k for k, r in rows.items() if r["source"] == "vendure"}
    fashion = {k for k, r in rows.items() if r["source"] == "fashion-mnist"}
    assert len(first_skus) == VENDURE_PRODUCTS
    assert vendure == first_skus
    assert len(fashion) == FASHION
    assert infos[0].rows == VENDURE_PRODUCTS + FASHION
    assert (infos[0].added, infos[0].changed, infos[0].deleted) == (VENDURE_PRODUCTS + FASHION, 0, 0)
    assert all(r["updated_at"].date() < START for r in rows.values()), "day-1 products were edited before"


def test_known_products_have_their_real_categories_brands_and_options(built):
    root, _ = built
    rows = _rows(root, START)
    laptop = rows["L2201308"]
    assert laptop["title"] == "Laptop"
    assert laptop["category_path"] == "Electronics > Computers"
    assert laptop["brand"] == "Apple"
    assert laptop["price"] == 1299.0
    assert laptop["attributes"] == {"brand": "Apple", "screen size": "13 inch", "RAM": "8GB"}
    assert laptop["description"].startswith("Now equipped with seventh-generation Intel Core")
    shoe = rows["RS0040"]
    assert shoe["category_path"] == "Sports & Outdoor > Footwear"
    assert shoe["attributes"] == {"brand": "Adidas", "color": "blue, pink", "size": "Size 40"}
    cactus = rows["SC011001"]
    assert (cactus["category_path"], cactus["brand"]) == ("Home & Garden > Plants", None)
    assert cactus["attributes"] == {"plant type": "Indoor"}
    assert rows["A58477"]["attributes"] == {"plant type": "Outdoor, Indoor"}


def test_fashion_items_are_real_images_with_honest_listings(built):
    root, _ = built
    images, labels = load_fashion_mnist(RAW, "test")
    groups = {"Ankle boot": "Footwear", "Sneaker": "Footwear", "Sandal": "Footwear", "Bag": "Accessories",
              "Trouser": "Bottoms", "Coat": "Outerwear", "Dress": "Dresses"}
    rows = _rows(root, START)
    fashion = [r for r in rows.values() if r["source"] == "fashion-mnist"]
    for row in fashion:
        index = int(row["product_id"].removeprefix("FM-T-"))
        name = FASHION_CLASSES[labels[index]]
        assert row["title"] == f"{name} {row['product_id']}"
        assert row["attributes"] == {"category": name}
        assert row["category_path"].startswith("Fashion > ") and row["category_path"].endswith(f" > {name}")
        if name in groups:
            assert row["category_path"] == f"Fashion > {groups[name]} > {name}"
        assert row["brand"] is None
        assert "synthetic" in row["description"]
        base = sample_catalog.FASHION_BASE_PRICES[name]
        assert base * 0.85 - 1 <= row["price"] <= base * 1.15 + 1
        assert round(row["price"] % 1, 2) == 0.99
        with Image.open(io.BytesIO(row["image_bytes"])) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
            np.testing.assert_array_equal(np.asarray(image), images[index])


def test_every_image_decodes_and_vendure_photos_are_the_real_files(built):
    root, infos = built
    raw_photos = {p.read_bytes() for p in (RAW / "vendure" / "images").glob("*.jpg")}
    for info in infos:
        for row in _rows(root, info.date).values():
            with Image.open(io.BytesIO(row["image_bytes"])) as image:
                image.load()
                if row["source"] == "vendure":
                    assert image.format == "JPEG" and min(image.size) >= 500
    day_one = _rows(root, START)
    assert all(r["image_bytes"] in raw_photos for r in day_one.values() if r["source"] == "vendure")


def _diff(before: dict[str, dict], after: dict[str, dict]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    fields = {"title": "title", "attributes": "attributes", "price": "price", "image": "image_bytes"}
    changed = {}
    for key in sorted(before.keys() & after.keys()):
        kinds = sorted(kind for kind, column in fields.items() if before[key][column] != after[key][column])
        if kinds:
            changed[key] = kinds
    return sorted(after.keys() - before.keys()), changed, sorted(before.keys() - after.keys())


def test_churn_manifest_agrees_with_an_independent_diff(built):
    root, infos = built
    ever_deleted: set[str] = set()
    for info, previous in zip(infos[1:], _dates()):
        before, after = _rows(root, previous), _rows(root, info.date)
        added, changed, deleted = _diff(before, after)
        manifest = _manifest(root, info.date)
        assert manifest["added"] == added
        assert manifest["changed"] == changed
        assert manifest["deleted"] == deleted
        assert manifest["rows"] == len(after) == info.rows
        assert manifest["previous_snapshot_date"] == previous.isoformat()
        assert (info.added, info.changed, info.deleted) == (len(added), len(changed), len(deleted))
        assert manifest["counts"] == {"added": len(added), "changed": len(changed), "deleted": len(deleted)}
        # Rates of the previous day's live products, rounded half up.
        n = len(before)
        assert len(deleted) == int(CHURN.delete * n + 0.5)
        assert len(changed) == int(CHURN.change * n + 0.5)
        assert len(added) == int(CHURN.add * n + 0.5)
        assert {"vendure", "fashion-mnist"} <= {after[k]["source"] for k in added}
        # Deleted products never come back; changes touch only the four kinds and bump updated_at.
        assert not (ever_deleted & after.keys())
        ever_deleted |= set(deleted)
        day_start = datetime.datetime.combine(info.date, datetime.time(), datetime.timezone.utc)
        for key in before.keys() & after.keys():
            old, new = before[key], after[key]
            for column in ("description", "category_path", "brand", "currency", "source"):
                assert old[column] == new[column], (key, column)
            if key in changed:
                assert new["updated_at"] >= day_start > old["updated_at"]
            else:
                assert new["updated_at"] == old["updated_at"]
        assert all(after[k]["updated_at"] >= day_start for k in added)
    kinds = {kind for info in infos[1:] for ks in _manifest(root, info.date)["changed"].values() for kind in ks}
    assert kinds == {"title", "attributes", "price", "image"}


def test_added_vendure_variants_carry_their_own_sku_price_and_options(built):
    root, infos = built
    variants = {v["id"]: v for v in _csv_variants() if not v["first"]}
    assert {"404.038.96-mint", "404.038.96-pearl"} <= variants.keys()
    seen = 0
    for info in infos[1:]:
        after = _rows(root, info.date)
        for key in _manifest(root, info.date)["added"]:
            row = after[key]
            if row["source"] != "vendure":
                continue
            variant = variants[key]
            assert row["price"] == variant["price"]
            assert row["title"] == " ".join([variant["name"], *variant["values"]])
            assert set(variant["values"]) <= set(row["attributes"].values())
            seen += 1
    assert seen >= 2


def test_rates_and_seed_are_recorded_in_the_manifest(built):
    root, _ = built
    parameters = _manifest(root, START)["parameters"]
    assert parameters["seed"] == 7 and parameters["fashion_items"] == FASHION
    assert parameters["start_date"] == START.isoformat()
    assert parameters["churn"]["delete"] == CHURN.delete and len(parameters["raw_data_sha256"]) == 64


def test_same_parameters_give_identical_bytes(built, tmp_path):
    root, _ = built
    again = build_sample_snapshots(f"file://{tmp_path}", str(RAW), START, days=DAYS, fashion_items=FASHION, seed=7)
    assert [i.reused for i in again] == [False] * DAYS
    for day in _dates():
        for name in ("catalog.parquet", "_churn.json"):
            assert (_folder(tmp_path, day) / name).read_bytes() == (_folder(root, day) / name).read_bytes()


def test_rerun_reuses_and_changed_parameters_rebuild(tmp_path):
    first = build_sample_snapshots(str(tmp_path), str(RAW), START, days=1, fashion_items=10, seed=7)
    parquet = _folder(tmp_path, START) / "catalog.parquet"
    original, mtime = parquet.read_bytes(), parquet.stat().st_mtime_ns
    again = build_sample_snapshots(str(tmp_path), str(RAW), START, days=2, fashion_items=10, seed=7)
    assert [i.reused for i in again] == [True, False], "extending a series reuses its first days"
    assert again[0] == SnapshotInfo(**{**first[0].__dict__, "reused": True})
    assert parquet.stat().st_mtime_ns == mtime
    other = build_sample_snapshots(str(tmp_path), str(RAW), START, days=1, fashion_items=10, seed=8)
    assert other[0].reused is False
    assert parquet.read_bytes() != original
    assert _manifest(tmp_path, START)["parameters"]["seed"] == 8
    # A damaged file is rebuilt, even with matching parameters.
    parquet.write_bytes(b"not parquet")
    assert build_sample_snapshots(str(tmp_path), str(RAW), START, days=1, fashion_items=10, seed=8)[0].reused is False
    assert pq.read_table(parquet).num_rows == VENDURE_PRODUCTS + 10


def test_a_failed_write_leaves_no_half_file(tmp_path, monkeypatch):
    def explode(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(sample_catalog.pq, "write_table", explode)
    with pytest.raises(OSError, match="disk full"):
        build_sample_snapshots(str(tmp_path), str(RAW), START, days=1, fashion_items=5)
    assert list(_folder(tmp_path, START).iterdir()) == []


def test_missing_raw_data_names_the_fix(tmp_path):
    with pytest.raises(SampleDataMissing, match=r"Vendure sample data not found at .*vendure.*make setup"):
        build_sample_snapshots(str(tmp_path / "out"), str(tmp_path / "raw"), START)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "vendure").symlink_to(RAW / "vendure")
    with pytest.raises(SampleDataMissing, match=r"Fashion-MNIST test files not found.*make setup"):
        build_sample_snapshots(str(tmp_path / "out"), str(raw), START)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fashion_items=10001"):
        build_sample_snapshots(str(tmp_path), str(RAW), START, fashion_items=10_001)
    with pytest.raises(ValueError, match="days=0"):
        build_sample_snapshots(str(tmp_path), str(RAW), START, days=0)
    with pytest.raises(TypeError, match="datetime.date"):
        build_sample_snapshots(str(tmp_path), str(RAW), datetime.datetime(2024, 3, 1))


def test_fashion_mnist_reader_gives_the_known_arrays():
    images, labels = load_fashion_mnist(RAW, "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the published first test labels
    assert np.bincount(labels).tolist() == [1000] * 10


def test_idx_reader_rejects_a_truncated_file(tmp_path):
    data = gzip.decompress((RAW / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    whole = tmp_path / "labels.idx"
    whole.write_bytes(data)
    assert read_idx(whole).shape == (10_000,)
    cut = tmp_path / "cut.idx"
    cut.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(cut)
    with pytest.raises(ValueError, match="split 'valid'"):
        load_fashion_mnist(RAW, "valid")
