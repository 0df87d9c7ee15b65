"""Training sets for MOON3.0 from the lake: a product corpus, query->product and product<->product positives.

    reader     live catalog products (``products``) and, for the sample data, Fashion-MNIST's 60k
               train / 10k test real images (jobs.sample_sources), as one corpus
    corpus     training_products: MERGE by product_id; each product's split is a function of its id
               (Fashion-MNIST's test split is ``test``, held out; others hash into train/validation)
    logs       interactions: simulated search sessions where the sample data has no search logs
               (``simulate_search_logs``; ``source = 'simulated:search-v1'``); logged events are
               used the same way
    pairs      moon3_query_pairs: search clicks (not ad-creative clicks) grouped by (query, product), with
               the product's split;
               moon3_product_pairs: each product paired with another of its leaf category and split.
               Both replace the export date's partition, so a rerun leaves the same tables.

The simulation, documented so its noise is known: one session per product (``sessions_per_product``):
a query drawn from the product's category and attribute vocabulary (``"ankle boot"``, ``"black
ankle boot"``, ``"footwear ankle boot"``), ``impressions_per_query`` products shown (the matching
product and random others, in random order), one click: on the matching product with probability
``1 - click_noise``, else on another shown product (noise: the click does not match the query;
``moon3_query_pairs.matches_category`` exposes it).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from moonpipe import delta
from moonpipe.progress import stage
from moonpipe.settings import Settings
from schemas.tables import INTERACTIONS, MOON3_PRODUCT_PAIRS, MOON3_QUERY_PAIRS, PRODUCTS, TRAINING_PRODUCTS

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOG = logging.getLogger("moonpipe.jobs.training_data")
SIMULATION_SOURCE = "simulated:search-v1"
SPLITS = ("train", "validation", "test")
FASHION_ID_PREFIX = {"train": "FM-TR-", "test": "FM-T-"}  # FM-T- matches the sample catalog's ids


@dataclass
class ExportSummary:
    run_date: str
    corpus_rows: int = 0
    corpus_by_split: dict[str, int] = field(default_factory=dict)
    corpus_inserted: int = 0
    corpus_updated: int = 0
    catalog_products: int = 0
    catalog_without_category: int = 0  # live catalog products left out: no category to learn or test
    fashion_mnist_products: int = 0
    simulated_sessions: int = 0
    simulated_events: int = 0
    simulated_events_inserted: int = 0
    simulated_noisy_clicks: int = 0
    click_events: int = 0
    clicks_on_unknown_products: int = 0  # clicks whose product is not in the corpus (reported, not paired)
    query_pairs: int = 0
    query_pairs_by_split: dict[str, int] = field(default_factory=dict)
    query_pairs_not_matching: int = 0
    product_pairs: int = 0
    product_pairs_by_split: dict[str, int] = field(default_factory=dict)
    single_product_categories: int = 0  # (category, split) groups with one product: no positive exists
    table_versions: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unit(*keys: object) -> float:
    """A uniform number in [0, 1) fixed by ``keys`` (stable across processes and runs)."""
    digest = hashlib.sha256(":".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(product_id: str, validation_fraction: float) -> str:
    """The product's split: Fashion-MNIST's test split stays ``test``; others hash by id."""
    if product_id.startswith(FASHION_ID_PREFIX["test"]):
        return "test"
    return "validation" if _unit("split", product_id) < validation_fraction else "train"


def reasoning_target(category: str, attributes: dict[str, str]) -> str:
    """The reasoning the SFT warm-up teaches: category first, then the other attributes sorted."""
    parts = [f"category: {category}"]
    parts += [f"{k}: {v}" for k, v in sorted(attributes.items()) if k.lower() != "category" and v]
    return "; ".join(parts)


def _leaf(category_path: str | None) -> str | None:
    if not category_path or not category_path.strip():
        return None
    return category_path.split(">")[-1].strip() or None


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# -- the corpus ------------------------------------------------------------------------------------


def _catalog_rows(settings: Settings, summary: ExportSummary) -> list[dict[str, Any]]:
    uri = settings.table_uri("products")
    if not delta.exists(uri):
        LOG.info("no products table at %s: the corpus holds the Fashion-MNIST images only", uri)
        return []
    columns = ["product_id", "title", "description", "category_path", "attributes", "image_bytes", "is_deleted"]
    rows = []
    for row in delta.read_arrow(uri, columns=columns).to_pylist():
        if row["is_deleted"]:
            continue
        attributes = dict(row["attributes"] or [])
        category = _leaf(row["category_path"]) or attributes.get("category")
        summary.catalog_products += 1
        if category is None:
            summary.catalog_without_category += 1
            continue
        rows.append(
            {
                "product_id": row["product_id"],
                "source": "catalog",
                "title": row["title"],
                "description": row["description"],
                "category": category,
                "category_path": row["category_path"],
                "attributes": attributes,
                "image_bytes": row["image_bytes"],
            }
        )
    return rows


def _fashion_rows(settings: Settings, split: str, limit: int | None) -> list[dict[str, Any]]:
    from jobs.sample_catalog import FASHION_GROUPS
    from jobs.sample_sources import FASHION_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist(settings.raw_data_dir, split)
    count = len(labels) if limit is None else min(limit, len(labels))
    rows = []
    for index in range(count):
        name = FASHION_CLASSES[int(labels[index])]
        product_id = f"{FASHION_ID_PREFIX[split]}{index:05d}"
        rows.append(
            {
                "product_id": product_id,
                "source": "fashion-mnist",
                "title": f"{name} {product_id}",
                "description": f"{name} from Fashion-MNIST ({split} split): a real 28x28 grayscale product photo.",
                "category": name,
                "category_path": f"Fashion > {FASHION_GROUPS[name]} > {name}",
                "attributes": {"category": name},
                "image_bytes": _png(images[index]),
            }
        )
    return rows


def _content_hash(row: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for key in ("title", "description", "category", "category_path"):
        digest.update(f"{key}={row[key]}\x00".encode())
    for key, value in sorted(row["attributes"].items()):
        digest.update(f"attr:{key}={value}\x00".encode())
    digest.update(hashlib.sha256(row["image_bytes"]).digest())
    return digest.hexdigest()


def build_corpus(
    settings: Settings,
    run_date: date,
    summary: ExportSummary,
    *,
    fashion_mnist: bool,
    fashion_train_limit: int | None,
    fashion_test_limit: int | None,
    validation_fraction: float,
) -> pa.Table:
    """The corpus as an Arrow table conformed to TRAINING_PRODUCTS; catalog rows win on shared ids."""
    rows = _catalog_rows(settings, summary)
    if fashion_mnist:
        seen = {r["product_id"] for r in rows}
        fashion = _fashion_rows(settings, "train", fashion_train_limit) + _fashion_rows(
            settings, "test", fashion_test_limit
        )
        fashion = [r for r in fashion if r["product_id"] not in seen]
        summary.fashion_mnist_products = len(fashion)
        rows += fashion
    if not rows:
        raise ValueError(
            "the training corpus is empty: no live catalog products with a category and Fashion-MNIST "
            "off; ingest a snapshot first (`moonpipe ingest --date D`) or export with Fashion-MNIST on"
        )
    for row in rows:
        row["split"] = split_of(row["product_id"], validation_fraction)
        row["reasoning_target"] = reasoning_target(row["category"], row["attributes"])
        row["content_hash"] = _content_hash(row)
        row["attributes"] = list(row["attributes"].items())
        row["exported_date"] = run_date
    return pa.Table.from_pylist(rows, schema=TRAINING_PRODUCTS.arrow_schema())


# -- simulated search logs -------------------------------------------------------------------------


def _query_for(category: str, group: str | None, attributes: list[tuple[str, str]], draw: float) -> str:
    """A query from the product's vocabulary: the category, alone or with an attribute or its group."""
    base = category.lower().replace("/", " ")
    values = [v.lower() for k, v in attributes if k.lower() not in ("category", "size", "sku") and v]
    if values and draw < 0.4:
        return f"{values[int(draw / 0.4 * len(values))]} {base}"
    if group and draw >= 0.7:
        return f"{group.lower()} {base}"
    return base


def simulate_search_logs(
    corpus: pa.Table,
    run_date: date,
    *,
    sessions_per_product: int = 1,
    impressions_per_query: int = 4,
    click_noise: float = 0.1,
    seed: int = 0,
) -> tuple[pa.Table, int]:
    """Simulated query, impression and click events (INTERACTIONS rows) and the noisy-click count.
    Event ids are fixed by (seed, date, session), so re-simulating gives the same events."""
    if not 0 <= click_noise < 1 or impressions_per_query < 1 or sessions_per_product < 0:
        raise ValueError(
            f"simulation parameters out of range: click_noise={click_noise} (need [0, 1)), "
            f"impressions_per_query={impressions_per_query} (>= 1), sessions_per_product={sessions_per_product} (>= 0)"
        )
    ids = corpus.column("product_id").to_pylist()
    categories = corpus.column("category").to_pylist()
    paths = corpus.column("category_path").to_pylist()
    attributes = corpus.column("attributes").to_pylist()
    n = len(ids)
    rng = np.random.default_rng([seed, run_date.toordinal()])
    sessions = n * sessions_per_product
    target = np.tile(np.arange(n), sessions_per_product)
    shown = rng.integers(0, n, size=(sessions, impressions_per_query))
    shown[:, 0] = target
    order = rng.permuted(np.tile(np.arange(impressions_per_query), (sessions, 1)), axis=1)
    shown = np.take_along_axis(shown, order, axis=1)
    target_slot = np.argmax(shown == target[:, None], axis=1)
    noisy = (rng.random(sessions) < click_noise) & (impressions_per_query > 1)
    other_slot = (target_slot + rng.integers(1, max(impressions_per_query, 2), size=sessions)) % impressions_per_query
    click_slot = np.where(noisy, other_slot, target_slot)
    draws = rng.random(sessions)
    start = datetime(run_date.year, run_date.month, run_date.day, tzinfo=timezone.utc)
    seconds = np.sort(rng.integers(0, 86_400, size=sessions))
    columns: dict[str, list] = {k: [] for k in ("event_id", "event_time", "event_type", "user_id", "query",
                                                "product_id", "position")}
    stamp = run_date.strftime("%Y%m%d")

    def event(eid: str, when: datetime, kind: str, user: str, query: str, product: str | None, pos: int | None):
        for key, value in zip(columns, (eid, when, kind, user, query, product, pos)):
            columns[key].append(value)

    for s in range(sessions):
        p = int(target[s])
        group = paths[p].split(">")[-2].strip() if paths[p] and paths[p].count(">") >= 1 else None
        query = _query_for(categories[p], group, attributes[p] or [], float(draws[s]))
        when = start + timedelta(seconds=int(seconds[s]))
        user = f"sim-user-{(s * 7919 + seed) % 5000:04d}"
        prefix = f"sim-{stamp}-{seed}-{s:07d}"
        event(f"{prefix}-q", when, "query", user, query, None, None)
        for slot in range(impressions_per_query):
            event(f"{prefix}-i{slot}", when, "impression", user, query, ids[int(shown[s, slot])], slot + 1)
        clicked = int(click_slot[s])
        event(f"{prefix}-c", when + timedelta(seconds=3), "click", user, query, ids[int(shown[s, clicked])], clicked + 1)
    size = len(columns["event_id"])
    columns.update(
        event_date=[run_date] * size, segment_id=[None] * size, creative_id=[None] * size,
        source=[SIMULATION_SOURCE] * size,
    )
    return pa.Table.from_pydict(columns, schema=INTERACTIONS.arrow_schema()), int(noisy.sum())


# -- the job ---------------------------------------------------------------------------------------


def export_training_sets(
    run_date: date | str,
    settings: Settings | None = None,
    spark: "SparkSession | None" = None,
    *,
    fashion_mnist: bool = True,
    fashion_train_limit: int | None = None,
    fashion_test_limit: int | None = None,
    validation_fraction: float = 0.05,
    simulate: bool = True,
    sessions_per_product: int = 1,
    impressions_per_query: int = 4,
    click_noise: float = 0.1,
    lookback_days: int = 30,
    seed: int = 0,
) -> ExportSummary:
    """Export MOON3.0's training sets for ``run_date``; returns the summary (``.as_dict()`` is JSON-able).

    ``fashion_*_limit`` cap the Fashion-MNIST images taken (tests); ``simulate`` adds simulated
    search sessions for the date to ``interactions`` (insert-only MERGE by event id: a rerun adds
    nothing). Pairs come from click events of the ``lookback_days`` up to ``run_date``.
    """
    import time

    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    from moonpipe.spark_session import get_spark

    run_date = date.fromisoformat(run_date) if isinstance(run_date, str) else run_date
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must lie in [0, 1)")
    if lookback_days < 1:
        raise ValueError(f"lookback_days={lookback_days} must be >= 1")
    settings = settings or Settings.from_env()
    spark = spark or get_spark()
    summary = ExportSummary(run_date=run_date.isoformat())
    uris = {name: settings.table_uri(name) for name in
            ("training_products", "interactions", "moon3_query_pairs", "moon3_product_pairs")}

    def timed(name: str):
        started = time.perf_counter()
        return lambda: summary.seconds.__setitem__(name, round(time.perf_counter() - started, 3))

    with stage("training corpus", LOG) as s:
        done = timed("corpus")
        corpus = build_corpus(
            settings, run_date, summary, fashion_mnist=fashion_mnist, fashion_train_limit=fashion_train_limit,
            fashion_test_limit=fashion_test_limit, validation_fraction=validation_fraction,
        )
        result = delta.merge(
            corpus, uris["training_products"], TRAINING_PRODUCTS,
            delta.MergeSpec(update_condition="s.content_hash <> t.content_hash"),
            metadata={"moonpipe.job": "export_training_sets", "moonpipe.run_date": run_date.isoformat()},
        )
        summary.corpus_rows = corpus.num_rows
        summary.corpus_inserted, summary.corpus_updated = result.inserted, result.updated
        splits = corpus.column("split").to_pylist()
        summary.corpus_by_split = {name: splits.count(name) for name in SPLITS}
        s.rows = corpus.num_rows
        done()

    if simulate:
        with stage("simulated search logs", LOG) as s:
            done = timed("simulate")
            events, noisy = simulate_search_logs(
                corpus.select(["product_id", "category", "category_path", "attributes"]), run_date,
                sessions_per_product=sessions_per_product, impressions_per_query=impressions_per_query,
                click_noise=click_noise, seed=seed,
            )
            written = delta.merge(
                events, uris["interactions"], INTERACTIONS,
                delta.MergeSpec(update=False, extra_predicate=f"t.event_date = '{run_date.isoformat()}'"),
                metadata={"moonpipe.job": "simulate_search_logs", "moonpipe.run_date": run_date.isoformat()},
            )
            summary.simulated_sessions = corpus.num_rows * sessions_per_product
            summary.simulated_events, summary.simulated_events_inserted = events.num_rows, written.inserted
            summary.simulated_noisy_clicks = noisy
            s.rows = events.num_rows
            done()
    del corpus

    if not delta.exists(uris["interactions"]):
        raise FileNotFoundError(
            f"no interactions table at {uris['interactions']}: load search logs first, or export with simulate=True"
        )
    with stage("query->product pairs", LOG) as s:
        done = timed("query_pairs")
        products = delta.read(spark, uris["training_products"]).select("product_id", "split", "category")
        first_day = run_date - timedelta(days=lookback_days - 1)
        clicks = (
            delta.read(spark, uris["interactions"])
            .where((F.col("event_type") == "click") & F.col("query").isNotNull() & F.col("product_id").isNotNull())
            # Search-result clicks only: clicks on ad creatives are the Creative4U data's signal.
            .where(F.col("creative_id").isNull())
            .where(F.col("event_date").between(F.lit(first_day), F.lit(run_date)))
        )
        grouped = clicks.groupBy("query", "product_id").agg(F.count(F.lit(1)).alias("clicks"))
        joined = grouped.join(products, "product_id", "left")
        pairs = (
            joined.where(F.col("split").isNotNull())
            .select(
                F.lit(run_date).alias("export_date"),
                F.sha2(F.concat_ws("\u0001", "query", "product_id"), 256).alias("pair_id"),
                "query", "product_id", "split", "clicks",
                (F.instr(F.lower("query"), F.lower(F.regexp_replace("category", "/", " "))) > 0)
                .alias("matches_category"),
            )
        ).cache()
        stats = joined.agg(
            F.sum("clicks").alias("clicks"), F.sum(F.when(F.col("split").isNull(), F.col("clicks"))).alias("unknown")
        ).first()
        summary.click_events, summary.clicks_on_unknown_products = int(stats["clicks"] or 0), int(stats["unknown"] or 0)
        written = delta.write(pairs, uris["moon3_query_pairs"], MOON3_QUERY_PAIRS, mode="overwrite",
                              replace_where={"export_date": run_date})
        by_split = {r["split"]: r["n"] for r in pairs.groupBy("split").agg(F.count(F.lit(1)).alias("n")).collect()}
        summary.query_pairs = written.rows_written
        summary.query_pairs_by_split = {k: int(by_split.get(k, 0)) for k in SPLITS}
        summary.query_pairs_not_matching = pairs.where(~F.col("matches_category")).count()
        pairs.unpersist()
        s.rows = written.rows_written
        done()

    with stage("product<->product pairs", LOG) as s:
        done = timed("product_pairs")
        window = Window.partitionBy("split", "category").orderBy("rank_key")
        ranked = products.withColumn("rank_key", F.sha2(F.concat_ws(":", F.lit(seed), "product_id"), 256))
        paired = ranked.select(
            F.lit(run_date).alias("export_date"),
            F.col("product_id").alias("anchor_id"),
            F.coalesce(F.lead("product_id").over(window), F.first("product_id").over(window)).alias("positive_id"),
            "category", "split",
        )
        summary.single_product_categories = paired.where(F.col("anchor_id") == F.col("positive_id")).count()
        paired = paired.where(F.col("anchor_id") != F.col("positive_id"))
        written = delta.write(paired, uris["moon3_product_pairs"], MOON3_PRODUCT_PAIRS, mode="overwrite",
                              replace_where={"export_date": run_date})
        by_split = {r["split"]: r["n"] for r in paired.groupBy("split").agg(F.count(F.lit(1)).alias("n")).collect()}
        summary.product_pairs = written.rows_written
        summary.product_pairs_by_split = {k: int(by_split.get(k, 0)) for k in SPLITS}
        s.rows = written.rows_written
        done()

    summary.table_versions = {name: delta.version(uri) for name, uri in uris.items()}
    return summary
