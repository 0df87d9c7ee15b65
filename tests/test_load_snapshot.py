"""Loading sample snapshots into the raw Delta table: counts, churn, idempotent reruns, errors."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.load_snapshot import load_snapshot, overview
from jobs.sample_catalog import build_sample_snapshots
from moonpipe import delta
from schemas import ContractViolation

START = date(2026, 11, 1)
DAYS = 3


@pytest.fixture(scope="module")
def loaded(spark, settings):
    infos = build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, START, days=DAYS, fashion_items=30)
    loads = [load_snapshot(START + timedelta(days=d), settings, spark) for d in range(DAYS)]
    return infos, loads


def _manifest(settings, day: date) -> dict:
    return json.loads(Path(settings.snapshot_uri(day.isoformat()), "_churn.json").read_text())


def test_each_day_lands_in_its_own_partition_with_every_row(spark, settings, loaded):
    infos, loads = loaded
    assert [l.rows for l in loads] == [i.rows for i in infos]
    assert infos[0].rows == 54 + 30
    table = delta.read(spark, settings.table_uri("catalog_snapshots"))
    per_day = {r.snapshot_date: r["count"] for r in table.groupBy("snapshot_date").count().collect()}
    assert per_day == {START + timedelta(days=d): infos[d].rows for d in range(DAYS)}
    laptop = table.where("snapshot_date = date'2026-11-01' AND title = 'Laptop'").collect()
    assert len(laptop) == 1 and laptop[0].category_path == "Electronics > Computers"
    assert laptop[0].attributes["brand"] == "Apple" and laptop[0].image_bytes[:2] == b"\xff\xd8"  # a real JPEG


def test_overview_churn_matches_the_snapshot_manifests(spark, settings, loaded):
    summary = overview(spark, settings)
    assert [d["snapshot_date"] for d in summary.per_date] == [(START + timedelta(days=d)).isoformat() for d in range(DAYS)]
    for day in summary.per_date[1:]:
        manifest = _manifest(settings, date.fromisoformat(day["snapshot_date"]))
        assert day["added"] == len(manifest["added"]) > 0
        assert day["deleted"] == len(manifest["deleted"]) > 0
        assert day["changed"] == len(manifest["changed"]) > 0
    assert sum(c["products"] for c in summary.top_categories) <= summary.per_date[-1]["rows"]


def test_rerunning_a_date_leaves_the_same_table(spark, settings, loaded):
    uri = settings.table_uri("catalog_snapshots")
    before = delta.read(spark, uri).drop("loaded_at").orderBy("snapshot_date", "product_id").collect()
    again = load_snapshot(START + timedelta(days=1), settings, spark)
    after = delta.read(spark, uri).drop("loaded_at").orderBy("snapshot_date", "product_id").collect()
    assert after == before
    assert again.rows == loaded[1][1].rows
    assert delta.history(uri, limit=1)[0]["operation"] == "WRITE"  # one commit: replace the partition


def test_a_snapshot_breaking_the_input_contract_is_refused(spark, settings, loaded, tmp_path):
    good = pq.read_table(Path(settings.snapshot_uri(START.isoformat()), "catalog.parquet"))
    bad_day = START + timedelta(days=30)
    folder = Path(settings.snapshot_uri(bad_day.isoformat()))
    folder.mkdir(parents=True)
    bad = good.set_column(good.schema.get_field_index("price"), "price", pa.array([str(p) for p in good["price"].to_pylist()]))
    pq.write_table(bad, folder / "catalog.parquet")
    version = delta.version(settings.table_uri("catalog_snapshots"))
    with pytest.raises(ContractViolation, match=r"snapshot .*dt=2026-12-01: table 'catalog_snapshot' .*column 'price': expected float64"):
        load_snapshot(bad_day, settings, spark)
    assert delta.version(settings.table_uri("catalog_snapshots")) == version  # nothing written


def test_a_missing_snapshot_names_the_fix(spark, settings):
    with pytest.raises(FileNotFoundError, match=r"no catalog snapshot at .*dt=2027-01-01.*moonpipe snapshots build"):
        load_snapshot(date(2027, 1, 1), settings, spark)


def test_tables_are_queryable_with_spark_sql(spark, settings, loaded):
    from moonpipe import delta

    registered = delta.register_views(
        spark, {"catalog_snapshots": settings.table_uri("catalog_snapshots"), "products": settings.table_uri("products")}
    )
    assert registered == ["catalog_snapshots"]  # products does not exist yet: skipped
    counts = spark.sql(
        "SELECT snapshot_date, count(*) AS n FROM catalog_snapshots GROUP BY snapshot_date ORDER BY snapshot_date"
    ).collect()
    assert [r.n for r in counts] == [l.rows for l in loaded[1]]
