"""The analysts' SQL views over the creative tables, runnable two ways from one definition:

* Spark SQL: ``register_spark_views(spark, settings)`` registers each table (moonpipe.delta) and
  each view as a temporary view; ``moonpipe sql`` and notebooks query them by name;
* without Spark: ``query(sql, settings)`` runs on DataFusion through deltalake's QueryBuilder,
  with the views a query names prepended as common table expressions.

The SQL keeps to what both engines accept (joins, GROUP BY, CASE, window functions, CAST).
docs/creatives.md shows each view with examples.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pyarrow as pa

from moonpipe import delta
from moonpipe.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

TABLES = ("creatives", "user_segments", "creative_judgments", "creative_scores", "interactions")

# name -> SELECT; a view may use tables and the views above it.
VIEWS: dict[str, str] = {
    # The latest run of each product, segment and model version (a run scores only changed groups).
    "creative_latest_scores": """
        SELECT s.* FROM creative_scores s
        JOIN (SELECT product_id, segment_id, model_version, MAX(run_date) AS latest_run
              FROM creative_scores GROUP BY product_id, segment_id, model_version) l
          ON s.product_id = l.product_id AND s.segment_id = l.segment_id
         AND s.model_version = l.model_version AND s.run_date = l.latest_run
    """,
    # Winner per product and segment, with the reasoning of its most confident won comparison.
    "creative_winners": """
        SELECT w.product_id, w.segment_id, w.model_version, w.run_date, w.creative_id AS winner_creative_id,
               w.strength, w.win_rate, w.comparisons, w.undecided, j.confidence, j.reasoning
        FROM creative_latest_scores w
        LEFT JOIN (
            SELECT run_date, product_id, segment_id, model_version, winner_creative_id, confidence, reasoning,
                   ROW_NUMBER() OVER (
                       PARTITION BY run_date, product_id, segment_id, model_version, winner_creative_id
                       ORDER BY confidence DESC, creative_a_id, creative_b_id) AS pick
            FROM creative_judgments WHERE winner_creative_id IS NOT NULL
        ) j ON j.pick = 1 AND j.run_date = w.run_date AND j.product_id = w.product_id
           AND j.segment_id = w.segment_id AND j.model_version = w.model_version
           AND j.winner_creative_id = w.creative_id
        WHERE w.is_selected
    """,
    # Every creative's score per run, and how its strength moved since its previous run.
    "creative_score_history": """
        SELECT product_id, segment_id, creative_id, model_version, run_date, strength, win_rate, rank, is_selected,
               strength - LAG(strength) OVER (
                   PARTITION BY product_id, segment_id, creative_id, model_version ORDER BY run_date) AS strength_change
        FROM creative_scores
    """,
    # Pairs judged in both orders with both decided: how often the LETTER won both times (the
    # answer followed the position, not the creative), and the share of "A" answers.
    "creative_position_bias": """
        SELECT a.run_date, a.model_version, COUNT(*) AS pairs_both_orders,
               SUM(CASE WHEN a.answer = b.answer THEN 1 ELSE 0 END) AS position_decided_pairs,
               CAST(SUM(CASE WHEN a.answer = b.answer THEN 1 ELSE 0 END) AS DOUBLE) / COUNT(*) AS position_bias_rate,
               CAST(SUM(CASE WHEN a.answer = 'A' THEN 1 ELSE 0 END) + SUM(CASE WHEN b.answer = 'A' THEN 1 ELSE 0 END)
                    AS DOUBLE) / (2 * COUNT(*)) AS answer_a_rate
        FROM creative_judgments a
        JOIN creative_judgments b
          ON a.run_date = b.run_date AND a.product_id = b.product_id AND a.segment_id = b.segment_id
         AND a.model_version = b.model_version
         AND a.creative_a_id = b.creative_b_id AND a.creative_b_id = b.creative_a_id
        WHERE a.creative_a_id < a.creative_b_id AND a.answer IS NOT NULL AND b.answer IS NOT NULL
        GROUP BY a.run_date, a.model_version
    """,
    # Comparisons the model left undecided (malformed output after its retries), per run.
    "creative_undecided_rate": """
        SELECT run_date, model_version, COUNT(*) AS comparisons,
               SUM(CASE WHEN answer IS NULL THEN 1 ELSE 0 END) AS undecided,
               CAST(SUM(CASE WHEN answer IS NULL THEN 1 ELSE 0 END) AS DOUBLE) / COUNT(*) AS undecided_rate,
               AVG(CAST(attempts AS DOUBLE)) AS mean_attempts
        FROM creative_judgments GROUP BY run_date, model_version
    """,
    # Impressions, clicks and CTR per creative and segment, over all logged and simulated days.
    "creative_ctr": """
        SELECT creative_id, segment_id,
               SUM(CASE WHEN event_type = 'impression' THEN 1 ELSE 0 END) AS impressions,
               SUM(CASE WHEN event_type = 'click' THEN 1 ELSE 0 END) AS clicks
        FROM interactions
        WHERE creative_id IS NOT NULL AND event_type IN ('impression', 'click')
        GROUP BY creative_id, segment_id
    """,
    # CreativePair: same product and segment, both creatives with more than 1,000 impressions,
    # the better CTR more than 60% above the worse (ctr_b * 1.6 < ctr_a, written without division).
    "creative_pairs": """
        SELECT ca.product_id, a.segment_id,
               a.creative_id AS better_creative_id, b.creative_id AS worse_creative_id,
               a.impressions AS better_impressions, b.impressions AS worse_impressions,
               CAST(a.clicks AS DOUBLE) / a.impressions AS better_ctr,
               CAST(b.clicks AS DOUBLE) / b.impressions AS worse_ctr
        FROM creative_ctr a
        JOIN creatives ca ON ca.creative_id = a.creative_id
        JOIN creative_ctr b ON b.segment_id = a.segment_id AND b.creative_id <> a.creative_id
        JOIN creatives cb ON cb.creative_id = b.creative_id AND cb.product_id = ca.product_id
        WHERE a.impressions > 1000 AND b.impressions > 1000
          AND CAST(a.clicks AS DOUBLE) * b.impressions > 1.6 * CAST(b.clicks AS DOUBLE) * a.impressions
    """,
}


def _references(sql: str) -> set[str]:
    words = set(re.findall(r"[a-z_]+", sql.lower()))
    return {name for name in (*TABLES, *VIEWS) if name in words}


def _closure(names: set[str]) -> set[str]:
    """``names`` plus every view and table they use, transitively."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in VIEWS:
            todo.extend(_references(VIEWS[name]))
    return seen


def _lake(settings: Settings) -> dict[str, str]:
    return {name: settings.table_uri(name) for name in TABLES}


def register_spark_views(spark: "SparkSession", settings: Settings | None = None) -> list[str]:
    """Register the creative tables and every view whose tables exist; returns the views registered."""
    settings = settings or Settings.from_env()
    present = set(delta.register_views(spark, _lake(settings)))
    registered = []
    for name, sql in VIEWS.items():
        needed = {t for t in _closure({name}) if t in TABLES}
        if needed <= present:
            spark.sql(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")
            registered.append(name)
    return registered


def query(sql: str, settings: Settings | None = None, tables: Mapping[str, str] | None = None) -> pa.Table:
    """Run ``sql`` (tables and views by name) on DataFusion over the Delta tables, without Spark."""
    from deltalake import QueryBuilder

    settings = settings or Settings.from_env()
    uris = dict(tables or _lake(settings))
    used = _closure(_references(sql))
    missing = sorted(t for t in used if t in TABLES and not delta.exists(uris[t]))
    if missing:
        raise FileNotFoundError(
            f"the query needs table(s) {missing}, not created yet under {settings.lake_uri}: run "
            f"`moonpipe creatives build-data --date D` (creatives, segments, interactions) and "
            f"`moonpipe score-creatives --date D` (judgments, scores) first"
        )
    builder = QueryBuilder()
    for name in sorted(t for t in used if t in TABLES):
        builder.register(name, delta.open_table(uris[name]))
    views = [name for name in VIEWS if name in used]  # VIEWS is in dependency order
    if views:
        ctes = ", ".join(f"{name} AS ({VIEWS[name]})" for name in views)
        own = re.match(r"\s*with\s", sql, flags=re.IGNORECASE)
        sql = f"WITH {ctes}, {sql[own.end():]}" if own else f"WITH {ctes} {sql}"
    return pa.RecordBatchReader.from_stream(builder.execute(sql)).read_all()
