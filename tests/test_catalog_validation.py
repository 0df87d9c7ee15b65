"""Catalog validation: GX row rules map planted bad rows to exactly their reason codes, batch rules
stop collapsed or duplicate-ridden snapshots, and the run leaves Data Docs."""

from __future__ import annotations

import dataclasses
import io
import random
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from jobs import catalog_validation as cv
from jobs.catalog_validation import ValidationLimits, annotate, check_image, validate_snapshot

GOOD_ROWS = 50
MISSING_FILE_ERROR = "image file 'img/gone.png' could not be read: [Errno 2] No such file or directory"


def _image(size: tuple[int, int] = (32, 32), fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _row(source_row: int, **overrides) -> dict:
    row = {
        "product_id": f"p-{source_row}",
        "title": f"Product {source_row}",
        "description": "A fine product.",
        "category_path": "Home > Kitchen",
        "brand": "Acme",
        "attributes": {"color": "red"},
        "price": 9.99,
        "currency": "EUR",
        "image_bytes": _image(seed=source_row, fmt="JPEG" if source_row % 2 else "PNG"),
        "image_uri": None,
        "source": "test",
        "updated_at": datetime(2026, 11, 1, 12, 0),
        "source_row": source_row,
        "image_load_error": None,
    }
    row.update(overrides)
    return row


def _frame(spark, rows: list[dict]):
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    from schemas.tables import CATALOG_SNAPSHOT

    schema = StructType(
        [*CATALOG_SNAPSHOT.spark_schema().fields, StructField("source_row", LongType()),
         StructField("image_load_error", StringType())]
    )
    return spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema)


_JPEG = _image((64, 64), "JPEG", seed=7)
# source_row -> (overrides, expected codes in rule order)
PLANTED: dict[int, tuple[dict, list[str]]] = {
    100: ({"image_bytes": b"this is not an image at all"}, ["image_undecodable"]),
    101: ({"image_bytes": _JPEG[: len(_JPEG) // 2]}, ["image_undecodable"]),
    102: ({"product_id": None}, ["missing_id"]),
    103: ({"product_id": "   "}, ["missing_id"]),
    104: ({"product_id": "dup-1"}, ["duplicate_id"]),
    105: ({"product_id": "dup-1"}, ["duplicate_id"]),
    106: ({"price": -3.5}, ["negative_price"]),
    107: ({"price": None}, ["missing_price"]),
    108: ({"title": ""}, ["empty_title"]),
    109: ({"title": "x" * 600}, ["title_too_long"]),
    110: (
        {"image_bytes": None, "image_uri": "img/gone.png", "image_load_error": MISSING_FILE_ERROR},
        ["image_missing"],
    ),
    111: ({"image_bytes": _image((1, 1))}, ["image_too_small"]),
    112: ({"title": " \t", "price": -1.25}, ["empty_title", "negative_price"]),
    113: ({"price": float("nan"), "description": "d" * 20_001}, ["description_too_long", "missing_price"]),
}


@pytest.fixture(scope="module")
def snapshot(spark):
    rows = [_row(i) for i in range(GOOD_ROWS)] + [_row(i, **o) for i, (o, _) in PLANTED.items()]
    return _frame(spark, rows).cache()


@pytest.fixture(scope="module")
def verdict(snapshot, tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    return validate_snapshot(snapshot, snapshot_date="2026-11-02", previous_rows=100, docs_dir=str(docs))


def test_row_reasons_are_exactly_the_planted_rows(verdict):
    assert {row: [code for code, _ in found] for row, found in verdict.row_reasons.items()} == {
        row: codes for row, (_, codes) in PLANTED.items()
    }
    assert not set(verdict.row_reasons) & set(range(GOOD_ROWS))
    assert verdict.statistics["rows"] == GOOD_ROWS + len(PLANTED)
    assert verdict.statistics["rows_rejected"] == len(PLANTED)
    assert verdict.statistics["rejected_image_undecodable"] == 2
    assert verdict.gx_success is False  # rows were rejected: the row suite failed, as it should


def test_messages_name_the_value(verdict):
    message = {row: dict(found) for row, found in verdict.row_reasons.items()}
    assert message[106]["negative_price"] == "price -3.5 is negative"
    assert message[112]["negative_price"] == "price -1.25 is negative"
    assert message[107]["missing_price"] == "price is null"
    assert message[113]["missing_price"] == "price is NaN"
    assert message[109]["title_too_long"] == "title has 600 characters, limit 500"
    assert message[113]["description_too_long"] == "description has 20,001 characters, limit 20,000"
    assert message[102]["missing_id"] == "product_id is null"
    assert message[103]["missing_id"] == "product_id is blank ('   ')"
    assert "'dup-1' appears on 2 rows" in message[104]["duplicate_id"]
    assert MISSING_FILE_ERROR in message[110]["image_missing"]
    assert message[111]["image_too_small"].startswith("image is 1x1 pixels")
    assert "cannot be decoded fully" in message[101]["image_undecodable"]  # opens, fails on load()
    assert "cannot be opened" in message[100]["image_undecodable"]


def test_batch_passes_and_data_docs_are_built(verdict):
    assert verdict.batch_ok, verdict.batch_failures
    assert verdict.batch_failures == []
    assert verdict.statistics["previous_rows"] == 100
    assert verdict.statistics["duplicate_rows"] == 2
    assert verdict.statistics["duplicate_rate"] == pytest.approx(2 / (GOOD_ROWS + len(PLANTED)))
    index = Path(verdict.docs_index)
    assert index.name == "index.html" and index.is_file()
    pages = [p.read_text() for p in index.parent.glob("validations/**/*.html")]
    assert len(pages) == 2  # row suite and batch suite of this run
    assert any("catalog_snapshot_rows" in page for page in pages)


def test_row_count_collapse_fails_the_batch(snapshot, tmp_path):
    rows = GOOD_ROWS + len(PLANTED)
    result = validate_snapshot(snapshot, snapshot_date="2026-11-02", previous_rows=200, docs_dir=str(tmp_path))
    assert not result.batch_ok
    assert result.batch_failures == [
        (
            f"snapshot 2026-11-02 has {rows} rows, fewer than 50% of the previous snapshot's 200 (at least 100 "
            "expected): a partial export? Re-export it, or lower min_row_ratio if the catalog really shrank"
        )
    ]
    assert len(result.row_reasons) == len(PLANTED)  # row verdicts are still reported


def test_duplicate_rate_and_image_size_limits(spark, tmp_path):
    rows = [_row(i) for i in range(8)] + [_row(8, product_id="p-0"), _row(9, image_bytes=_image((40, 40)))]
    limits = ValidationLimits(max_image_pixels=1_500)
    result = validate_snapshot(
        _frame(spark, rows), snapshot_date="2026-11-03", previous_rows=None, docs_dir=str(tmp_path), limits=limits
    )
    assert {row: [c for c, _ in found] for row, found in result.row_reasons.items()} == {
        0: ["duplicate_id"], 8: ["duplicate_id"], 9: ["image_too_large"],
    }
    assert result.row_reasons[9][0][1] == "image is 40x40 = 1,600 pixels, limit 1,500"
    assert not result.batch_ok
    assert len(result.batch_failures) == 1
    assert "2 rows (20.0%) share their product_id" in result.batch_failures[0]
    assert "over the 5.0% limit" in result.batch_failures[0]
    assert result.statistics["duplicate_rate"] == pytest.approx(0.2)


def test_clean_batch_passes(spark, tmp_path):
    result = validate_snapshot(
        _frame(spark, [_row(i) for i in range(12)]), snapshot_date="2026-11-04", previous_rows=20,
        docs_dir=str(tmp_path / "docs"),
    )
    assert result.row_reasons == {}
    assert result.batch_ok and result.gx_success
    assert (tmp_path / "docs" / "index.html").is_file()


def test_empty_snapshot_fails_the_batch(spark, tmp_path):
    result = validate_snapshot(_frame(spark, []), snapshot_date="2026-11-06", previous_rows=None, docs_dir=str(tmp_path))
    assert result.row_reasons == {} and not result.batch_ok
    assert result.batch_failures == ["snapshot 2026-11-06 has 0 rows: an empty or failed export? Re-export it"]


def test_a_rule_where_gx_and_spark_disagree_raises(spark, tmp_path, monkeypatch):
    from pyspark.sql import functions as F

    original = cv._row_rules

    def broken(limits):
        # the Spark side of price_not_negative now counts zero prices too: the two engines disagree
        return [
            dataclasses.replace(rule, violated=lambda: F.col("price_value") <= 0)
            if rule.name == "price_not_negative" else rule
            for rule in original(limits)
        ]

    monkeypatch.setattr(cv, "_row_rules", broken)
    frame = _frame(spark, [_row(0, price=0.0), _row(1, price=-1.0), _row(2)])
    with pytest.raises(cv.ValidationDisagreement, match="price_not_negative"):
        validate_snapshot(frame, snapshot_date="2026-11-05", previous_rows=None, docs_dir=str(tmp_path))


def test_annotate_helper_columns(spark):
    frame = _frame(spark, [_row(0), _row(1, product_id="p-0", title="héllo"), _row(2, product_id=" ")])
    got = {
        r.source_row: r
        for r in annotate(frame, ValidationLimits()).select(
            "source_row", "image_status", "image_width", "title_chars", "id_count", "is_duplicate"
        ).collect()
    }
    assert [got[i].id_count for i in range(3)] == [2, 2, None]
    assert [got[i].is_duplicate for i in range(3)] == [1, 1, 0]
    assert got[1].title_chars == 5 and got[0].image_status == "ok" and got[0].image_width == 32


def test_check_image_size_guards():
    limits = ValidationLimits(max_image_bytes=100)
    status, message, _, _ = check_image(_image((32, 32)), None, limits)
    assert status == "too_large" and "limit 100" in message
    # a tiny file declaring a huge canvas is refused before any pixel is decoded
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    status, message, width, _ = check_image(bomb.getvalue(), None, ValidationLimits())
    assert (status, width) == ("too_large", 10_000)
    assert "100,000,000 pixels" in message
    assert check_image(None, None, limits)[0] == "missing"
