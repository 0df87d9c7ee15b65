"""The creative jobs on real Spark and Delta: creative data with a known truth (interactions,
CreativePair), score-creatives with the tiny Creative4U (guided decoding), idempotent reruns,
an unreadable creative quarantined, changed groups only, and the SQL views on Spark SQL and on
DataFusion returning the expected rows."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timezone

import pyarrow as pa
import pytest

from jobs.creative_data import SOURCE, build_creative_data, training_examples
from jobs.creative_views import VIEWS, query, register_spark_views
from jobs.score_creatives import score_creatives
from model.creative4u_checkpoint import build_model, save_checkpoint
from model.creative4u_config import Creative4UConfig
from model.creative4u_protocol import parse_output
from moonpipe import delta
from moonpipe.settings import Settings
from schemas.tables import CREATIVES, INTERACTIONS

D1, D2 = date(2026, 11, 1), date(2026, 11, 2)
DATA = {"vendure_products": 2, "fashion_products": 1, "creatives_per_product": 4, "mean_impressions": 1100}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Settings:
    settings = Settings.from_env(home=tmp_path_factory.mktemp("creatives-home"))
    save_checkpoint(build_model(Creative4UConfig(decoding="guided", guided_think_tokens=6)), settings.creative_model)
    return settings


@pytest.fixture(scope="module")
def data(spark, home):
    return build_creative_data(D1, home, spark, **DATA)


@pytest.fixture(scope="module")
def scored(spark, home, data):
    return score_creatives(D1, home, spark)


def _rows(settings: Settings, table: str) -> list[dict]:
    return delta.read_arrow(settings.table_uri(table)).to_pylist()


def test_creative_data_and_creative_pairs(spark, home, data):
    assert (data.products, data.creatives, data.segments) == (3, 12, 4)
    events = delta.read_arrow(home.table_uri(INTERACTIONS.name), columns=["event_type", "creative_id", "segment_id", "source"])
    counts: dict[tuple, list[int]] = {}
    for row in events.to_pylist():
        assert row["source"] == SOURCE
        counts.setdefault((row["creative_id"], row["segment_id"]), [0, 0])[row["event_type"] == "click"] += 1
    assert len(counts) == 48 and sum(v[0] for v in counts.values()) == data.impressions
    assert sum(v[1] for v in counts.values()) == data.clicks and 0 < data.clicks < data.impressions / 10
    assert any(v[0] <= 1000 for v in counts.values())  # some creatives stay under the threshold

    product = {r["creative_id"]: r["product_id"] for r in _rows(home, CREATIVES.name)}
    expected = set()
    for (a, seg), (b, seg_b) in itertools.permutations(counts, 2):
        (ia, ca), (ib, cb) = counts[(a, seg)], counts[(b, seg_b)]
        if seg == seg_b and product[a] == product[b] and ia > 1000 and ib > 1000 and ca / ia > 1.6 * cb / ib:
            expected.add((product[a], seg, a, b))
    pairs = query("SELECT * FROM creative_pairs", home)
    found = {(r["product_id"], r["segment_id"], r["better_creative_id"], r["worse_creative_id"]) for r in pairs.to_pylist()}
    assert found == expected and len(found) == data.creative_pairs > 0
    assert data.pair_label_agreement >= 0.9  # observed CTR labels agree with the click model's truth

    examples = training_examples(home, limit=3)
    assert len(examples) == 6 and [e.label for e in examples[:2]] == ["A", "B"]
    assert examples[0].creative_a_id == examples[1].creative_b_id
    assert all(parse_output(e.target).answer == e.label for e in examples)


def test_creative_data_rerun_changes_nothing_and_keeps_other_sources(spark, home, data):
    uri = home.table_uri(INTERACTIONS.name)
    other = pa.Table.from_pylist(
        [{"event_id": "search-1", "event_date": D1, "event_time": datetime(2026, 11, 1, 12, tzinfo=timezone.utc),
          "event_type": "query", "user_id": "u1", "segment_id": None, "query": "red dress", "product_id": None,
          "creative_id": None, "position": None, "source": "simulated:moon3-search"}],
        schema=INTERACTIONS.arrow_schema(),
    )
    delta.write(other, uri, INTERACTIONS)
    versions = {t: delta.version(home.table_uri(t)) for t in ("creatives", "user_segments", "interactions")}
    again = build_creative_data(D1, home, spark, **DATA)
    assert (again.creatives_inserted, again.creatives_updated, again.events_written, again.events_removed) == (0, 0, 0, 0)
    assert {t: delta.version(home.table_uri(t)) for t in versions} == versions
    kept = [r for r in _rows(home, INTERACTIONS.name) if r["source"] == "simulated:moon3-search"]
    assert len(kept) == 1 and kept[0]["event_type"] == "query"


def test_score_job_writes_judgments_and_scores(home, scored):
    assert (scored.groups, scored.groups_scored, scored.creatives_in_groups) == (12, 12, 48)
    assert scored.comparisons == 12 * 12 and scored.all_pairs_comparisons == 12 * 12  # N=4: budget covers all pairs
    assert scored.undecided == 0 and scored.quarantined == 0 and scored.comparisons_per_second > 0
    assert scored.decoding == "guided"  # the checkpoint's setting
    judgments = _rows(home, "creative_judgments")
    assert len(judgments) == scored.comparisons
    for j in judgments:
        assert parse_output(j["raw_output"]).answer == j["answer"] and j["attempts"] == 1
        assert j["winner_creative_id"] == (j["creative_a_id"] if j["answer"] == "A" else j["creative_b_id"])
        assert 0.5 <= j["confidence"] <= 1.0 and j["model_version"] == scored.model_version
    ordered = {(j["product_id"], j["segment_id"], j["creative_a_id"], j["creative_b_id"]) for j in judgments}
    assert all((p, s, b, a) in ordered for p, s, a, b in ordered)  # both orders of every pair
    scores = _rows(home, "creative_scores")
    groups: dict[tuple, list[dict]] = {}
    for row in scores:
        groups.setdefault((row["product_id"], row["segment_id"]), []).append(row)
    assert len(groups) == 12 and all(sorted(r["rank"] for r in g) == [1, 2, 3, 4] for g in groups.values())
    assert all(sum(r["is_selected"] for r in g) <= 1 for g in groups.values())
    assert all(r["comparisons"] == 6 for r in scores) and scored.selected == sum(r["is_selected"] for r in scores)


def test_views_agree_on_spark_and_datafusion_and_match_the_tables(spark, home, scored):
    registered = register_spark_views(spark, home)
    assert set(registered) == set(VIEWS)
    for name in VIEWS:
        on_spark = sorted(map(repr, spark.sql(f"SELECT * FROM {name}").toArrow().to_pylist()))
        on_datafusion = sorted(map(repr, query(f"SELECT * FROM {name}", home).to_pylist()))
        assert on_spark == on_datafusion, name

    judgments = _rows(home, "creative_judgments")
    answers = {(j["product_id"], j["segment_id"], j["creative_a_id"], j["creative_b_id"]): j["answer"] for j in judgments}
    pairs = [(k, (k[0], k[1], k[3], k[2])) for k in answers if k[2] < k[3]]
    same_letter = sum(answers[a] == answers[b] for a, b in pairs)
    [bias] = query("SELECT * FROM creative_position_bias", home).to_pylist()
    assert (bias["pairs_both_orders"], bias["position_decided_pairs"]) == (len(pairs), same_letter)
    assert bias["answer_a_rate"] == pytest.approx(sum(a == "A" for a in answers.values()) / len(answers))
    [undecided] = query("SELECT * FROM creative_undecided_rate", home).to_pylist()
    assert (undecided["comparisons"], undecided["undecided"], undecided["undecided_rate"]) == (144, 0, 0.0)
    winners = query("SELECT * FROM creative_winners", home).to_pylist()
    selected = {(r["product_id"], r["segment_id"], r["creative_id"]) for r in _rows(home, "creative_scores") if r["is_selected"]}
    assert {(w["product_id"], w["segment_id"], w["winner_creative_id"]) for w in winners} == selected
    assert all(w["reasoning"] is not None and w["confidence"] >= 0.5 for w in winners)


def test_rerun_of_a_date_leaves_the_same_tables(spark, home, scored):
    def snapshot(table, drop):
        return sorted(repr({k: v for k, v in r.items() if k != drop}) for r in _rows(home, table))

    before = (snapshot("creative_judgments", "judged_at"), snapshot("creative_scores", "scored_at"))
    again = score_creatives(D1, home, spark)
    assert (again.groups_scored, again.comparisons) == (scored.groups_scored, scored.comparisons)
    assert (snapshot("creative_judgments", "judged_at"), snapshot("creative_scores", "scored_at")) == before


def test_unreadable_creative_is_quarantined_and_only_changed_groups_rescored(spark, home, scored):
    [first] = [r for r in _rows(home, CREATIVES.name) if r["creative_id"] == "L2201308-cr00"]
    broken = {**first, "creative_id": "L2201308-cr99", "image_bytes": b"\xff\xd8 not a jpeg", "content_hash": "x" * 64,
              "created_date": D2}
    delta.merge(pa.Table.from_pylist([broken], schema=CREATIVES.arrow_schema()), home.table_uri(CREATIVES.name), CREATIVES)

    summary = score_creatives(D2, home, spark)
    assert (summary.groups, summary.groups_scored, summary.groups_unchanged) == (12, 4, 8)  # one product's groups
    assert summary.creatives_in_groups == 4 * 5 and summary.scored == 4 * 4
    assert summary.quarantined == 1 and summary.quarantine_reasons == {"image_undecodable": 1}
    [row] = [r for r in _rows(home, "quarantine") if r["stage"] == "score"]
    assert row["product_id"] == "L2201308" and row["reason_code"] == "image_undecodable"
    assert row["raw_image"] == broken["image_bytes"] and "L2201308-cr99" in row["raw_row"]
    latest = query("SELECT product_id, run_date, COUNT(*) AS n FROM creative_latest_scores GROUP BY product_id, run_date", home)
    assert sorted((r["product_id"], r["run_date"], r["n"]) for r in latest.to_pylist()) == sorted(
        [("L2201308", D2, 16), ("FM-T-00000", D1, 16), (_other_vendure(home), D1, 16)]
    )
    history = query("SELECT * FROM creative_score_history WHERE product_id = 'L2201308' AND run_date = DATE '2026-11-02'", home)
    assert history.num_rows == 16 and all(r["strength_change"] is not None for r in history.to_pylist())


def _other_vendure(settings: Settings) -> str:
    ids = {r["product_id"] for r in _rows(settings, CREATIVES.name)}
    [other] = ids - {"L2201308", "FM-T-00000"}
    return other


def test_cli_report_and_query_without_spark(home, scored, monkeypatch, capsys, tmp_path):
    import importlib.util

    from moonpipe.cli import main

    monkeypatch.setenv("MOONPIPE_HOME", home.home)
    assert main(["creatives", "query", "SELECT COUNT(*) AS n FROM creative_judgments WHERE run_date = DATE '2026-11-01'"]) == 0
    assert "144" in capsys.readouterr().out
    assert main(["creatives", "report", "--date", "2026-11-01"]) == 0
    out = capsys.readouterr().out
    assert "Winners:" in out and "of 12 product x segment groups" in out and "144 comparisons, undecided 0.0%" in out
    png = tmp_path / "report.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert main(["creatives", "report", "--png", str(png)]) == 2
        assert "--png needs matplotlib" in capsys.readouterr().err and not png.exists()
    else:
        assert main(["creatives", "report", "--png", str(png)]) == 0 and png.stat().st_size > 0


def test_a_smaller_rebuild_over_a_larger_one_scores_every_pair(spark, tmp_path):
    """The creative_pairs view spans every creative in the table: a run that composes fewer
    products than an earlier one still labels all of them (this crashed `moonpipe demo` on a home
    where `creatives build-data` had built more)."""
    settings = Settings.from_env(home=tmp_path / "home")
    larger = build_creative_data(D1, settings, spark, **DATA)
    smaller = build_creative_data(D2, settings, spark, **{**DATA, "vendure_products": 1})  # D1's events stay
    assert smaller.products < larger.products
    assert smaller.creative_pairs >= larger.creative_pairs > 0  # the view spans both dates
    assert smaller.pair_label_agreement is not None and smaller.pair_label_agreement >= 0.9
