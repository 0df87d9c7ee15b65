"""The MOON3.0 training-set export on real sample data: corpus splits, simulated logs, pairs, reruns."""

from __future__ import annotations

from datetime import date

import pytest

from jobs.training_data import export_training_sets, simulate_search_logs, split_of
from moonpipe import delta
from moonpipe.settings import Settings

RUN = date(2026, 11, 3)


@pytest.fixture(scope="module")
def export(spark, tmp_path_factory):
    settings = Settings.from_env(home=str(tmp_path_factory.mktemp("training-data")))
    first = export_training_sets(RUN, settings, spark, fashion_train_limit=400, fashion_test_limit=100,
                                 validation_fraction=0.1, click_noise=0.2)
    return settings, first


def test_corpus_holds_real_images_with_a_split_fixed_by_product(export):
    settings, summary = export
    corpus = delta.read_arrow(settings.table_uri("training_products")).to_pylist()
    assert summary.corpus_rows == len(corpus) == 500 == summary.fashion_mnist_products
    by_split = {s: sum(r["split"] == s for r in corpus) for s in ("train", "validation", "test")}
    assert by_split == summary.corpus_by_split
    assert by_split["test"] == 100 and 20 < by_split["validation"] < 65
    assert all(r["split"] == split_of(r["product_id"], 0.1) for r in corpus)
    assert all((r["split"] == "test") == r["product_id"].startswith("FM-T-") for r in corpus)
    boot = next(r for r in corpus if r["category"] == "Ankle boot")
    assert boot["reasoning_target"] == "category: Ankle boot"
    assert boot["image_bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_simulated_logs_and_pairs_are_consistent(export):
    settings, summary = export
    events = delta.read_arrow(settings.table_uri("interactions")).to_pylist()
    assert summary.simulated_sessions == 500 and summary.simulated_events == 500 * 6 == len(events)
    clicks = [e for e in events if e["event_type"] == "click"]
    assert len(clicks) == 500 == summary.click_events and summary.clicks_on_unknown_products == 0
    # Noise is the documented rate (0.2 of 500 sessions, binomial spread).
    assert 60 <= summary.simulated_noisy_clicks <= 140
    pairs = delta.read_arrow(settings.table_uri("moon3_query_pairs")).to_pylist()
    assert sum(p["clicks"] for p in pairs) == 500
    assert summary.query_pairs == len(pairs)
    # Clicks on the session's own product always name its category; noise clicks rarely do.
    assert summary.query_pairs_not_matching == sum(not p["matches_category"] for p in pairs)
    assert 0.6 * summary.simulated_noisy_clicks <= summary.query_pairs_not_matching <= summary.simulated_noisy_clicks
    product_pairs = delta.read_arrow(settings.table_uri("moon3_product_pairs")).to_pylist()
    corpus = {r["product_id"]: r for r in delta.read_arrow(settings.table_uri("training_products"),
                                                             columns=["product_id", "category", "split"]).to_pylist()}
    assert len(product_pairs) == summary.product_pairs == 500 - summary.single_product_categories
    for pair in product_pairs:
        anchor, positive = corpus[pair["anchor_id"]], corpus[pair["positive_id"]]
        assert pair["anchor_id"] != pair["positive_id"]
        assert anchor["category"] == positive["category"] == pair["category"]
        assert anchor["split"] == positive["split"] == pair["split"]


def test_rerun_leaves_the_same_tables(spark, export):
    settings, first = export
    before = {name: delta.read_arrow(settings.table_uri(name)).num_rows
              for name in ("training_products", "interactions", "moon3_query_pairs", "moon3_product_pairs")}
    again = export_training_sets(RUN, settings, spark, fashion_train_limit=400, fashion_test_limit=100,
                                 validation_fraction=0.1, click_noise=0.2)
    after = {name: delta.read_arrow(settings.table_uri(name)).num_rows for name in before}
    assert after == before
    assert again.corpus_inserted == again.corpus_updated == 0 and again.simulated_events_inserted == 0
    assert again.query_pairs == first.query_pairs and again.product_pairs == first.product_pairs


def test_bad_simulation_parameters_are_refused():
    import pyarrow as pa

    with pytest.raises(ValueError, match="click_noise"):
        simulate_search_logs(pa.table({"product_id": ["a"], "category": ["x"], "category_path": ["x"],
                                       "attributes": pa.array([[]], pa.map_(pa.string(), pa.string()))}),
                             RUN, click_noise=1.5)


def test_ad_creative_clicks_are_not_search_pairs(spark, export):
    import datetime as dt

    import pyarrow as pa

    from schemas.tables import INTERACTIONS

    settings, first = export
    when = dt.datetime(2026, 11, 3, 12, tzinfo=dt.timezone.utc)
    ad_click = pa.Table.from_pylist([{
        "event_id": "ad-click-1", "event_date": RUN, "event_time": when, "event_type": "click", "user_id": "u1",
        "segment_id": "s1", "query": "red dress", "product_id": "FM-TR-00000", "creative_id": "c1",
        "position": 1, "source": "simulated:creative-clicks",
    }], schema=INTERACTIONS.arrow_schema())
    delta.merge(ad_click, settings.table_uri("interactions"), INTERACTIONS)
    again = export_training_sets(RUN, settings, spark, fashion_train_limit=400, fashion_test_limit=100,
                                 validation_fraction=0.1, click_noise=0.2)
    assert again.click_events == first.click_events and again.query_pairs == first.query_pairs
    queries = delta.read_arrow(settings.table_uri("moon3_query_pairs"), columns=["query"]).column("query").to_pylist()
    assert "red dress" not in queries


def test_catalog_products_join_the_corpus_and_category_less_ones_are_counted(spark, tmp_path):
    import datetime as dt

    import pyarrow as pa

    from jobs.sample_sources import read_vendure_products
    from schemas.tables import PRODUCTS

    settings = Settings.from_env(home=str(tmp_path))
    vendure = read_vendure_products(settings.raw_data_dir)[:4]
    now = dt.datetime(2026, 11, 3, tzinfo=dt.timezone.utc)
    rows = [{
        "product_id": f"V-{i}", "title": p.name, "description": p.description,
        "category_path": p.category_path if i else None, "brand": None,
        "attributes": [(k, v) for k, v in p.facets if k != "category"], "price": p.variants[0].price,
        "currency": "USD", "image_bytes": p.image_path.read_bytes(), "source": "vendure", "content_hash": f"h{i}",
        "first_seen_date": RUN, "last_changed_date": RUN, "is_deleted": i == 3, "deleted_date": None, "updated_at": now,
    } for i, p in enumerate(vendure)]
    delta.write(pa.Table.from_pylist(rows, schema=PRODUCTS.arrow_schema()), settings.table_uri("products"), PRODUCTS)
    summary = export_training_sets(RUN, settings, spark, fashion_train_limit=20, fashion_test_limit=5)
    # V-0 has no category (left out, counted), V-3 is deleted (not live), V-1 and V-2 join the corpus.
    assert summary.catalog_products == 3 and summary.catalog_without_category == 1
    assert summary.corpus_rows == 2 + 25
    corpus = {r["product_id"]: r for r in delta.read_arrow(settings.table_uri("training_products")).to_pylist()}
    for pid in ("V-1", "V-2"):
        row = corpus[pid]
        assert row["source"] == "catalog" and row["category"] == vendure[int(pid[2:])].category_path.split(" > ")[-1]
        assert row["reasoning_target"].startswith(f"category: {row['category']}")
        assert row["split"] in ("train", "validation")
    assert "V-0" not in corpus and "V-3" not in corpus
