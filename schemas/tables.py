"""Every table of the pipeline, defined once. docs/tables.md is generated from this file
(`moonpipe schemas --markdown > docs/tables.md`); a test keeps the two in step."""

from __future__ import annotations

from schemas.contract import Column as C
from schemas.contract import TableContract

# Parquet row groups of tables with an image per row (~15 KB) or a vector per row (up to 6 KB):
# a few tens of MB each, so one file's scan splits across tasks (see TableContract.row_group_rows).
IMAGE_ROW_GROUP_ROWS = 1024
VECTOR_ROW_GROUP_ROWS = 4096

CATALOG_SNAPSHOT = TableContract(
    name="catalog_snapshot",
    is_delta_table=False,
    doc=(
        "The nightly catalog export as it arrives: one file set per day under "
        "`snapshots/dt=YYYY-MM-DD/` (Parquet or JSON Lines). Images come inline as bytes or as a "
        "path/URI relative to the snapshot. Row-level problems (no id, empty title, bad image) are "
        "not schema errors: ingest quarantines those rows with a reason."
    ),
    columns=(
        C("product_id", "string", doc="Merchant's stable product id; rows without one are quarantined."),
        C("title", "string", doc="Product name as shown to shoppers."),
        C("description", "string", doc="Free-text description."),
        C("category_path", "string", doc="Category tree, root first, joined by ` > `."),
        C("brand", "string", doc="Brand, when the merchant gives one."),
        C("attributes", "map<string,string>", doc="Merchant facets and options (color, size, material...)."),
        C("price", "float64", doc="Price in `currency`; must be >= 0."),
        C("currency", "string", doc="ISO 4217 code."),
        C("image_bytes", "binary", doc="Main image, encoded (JPEG/PNG); or null when `image_uri` is set."),
        C("image_uri", "string", doc="Main image path/URI, relative to the snapshot folder or absolute."),
        C("source", "string", doc="Feed that produced the row (e.g. `vendure`, `fashion-mnist`)."),
        C("updated_at", "timestamp", doc="When the merchant last changed the product."),
    ),
)

CATALOG_SNAPSHOTS = TableContract(
    name="catalog_snapshots",
    doc=(
        "Every snapshot as it arrived (the raw layer): the snapshot's rows unchanged plus their date, "
        "one partition per day. Loading a date again replaces its partition, so reruns and "
        "backfills are idempotent; history stays queryable for audits and reprocessing."
    ),
    partition_by=("snapshot_date",),
    columns=CATALOG_SNAPSHOT.columns
    + (
        C("snapshot_date", "date", nullable=False, doc="Date of the snapshot the row came from."),
        C("source_uri", "string", nullable=False, doc="Snapshot folder the row was read from."),
        C("loaded_at", "timestamp", nullable=False, doc="When the snapshot was loaded."),
    ),
)

PRODUCTS = TableContract(
    name="products",
    row_group_rows=IMAGE_ROW_GROUP_ROWS,
    doc=(
        "The clean catalog: one row per product ever seen, MERGEd by `product_id` from each validated "
        "snapshot. A product missing from a snapshot is kept with `is_deleted = true`, never removed."
    ),
    key=("product_id",),
    columns=(
        C("product_id", "string", nullable=False, doc="Merchant's stable product id."),
        C("title", "string", nullable=False, doc="Product name."),
        C("description", "string", doc="Free-text description."),
        C("category_path", "string", doc="Category tree, root first, joined by ` > `."),
        C("brand", "string", doc="Brand, if any."),
        C("attributes", "map<string,string>", doc="Merchant facets and options."),
        C("price", "float64", nullable=False, doc="Price, >= 0."),
        C("currency", "string", doc="ISO 4217 code."),
        C("image_bytes", "binary", nullable=False, doc="Main image, encoded, verified decodable."),
        C("source", "string", doc="Feed that produced the row."),
        C("content_hash", "string", nullable=False,
          doc="SHA-256 of the fields the models read; a change triggers re-embedding."),
        C("first_seen_date", "date", nullable=False, doc="Snapshot date the product first appeared."),
        C("last_changed_date", "date", nullable=False,
          doc="Snapshot date of the last change (unchanged rows are not rewritten nightly)."),
        C("is_deleted", "bool", nullable=False, doc="True once a snapshot no longer contains it."),
        C("deleted_date", "date", doc="Snapshot date of the deletion; null while live."),
        C("updated_at", "timestamp", nullable=False, doc="When this row last changed."),
    ),
)

QUARANTINE = TableContract(
    name="quarantine",
    row_group_rows=IMAGE_ROW_GROUP_ROWS,
    doc=(
        "Rows that a stage could not accept, with the reason and the raw row, so that nothing is "
        "dropped silently. Rerunning a stage for a date replaces that stage's rows for the date."
    ),
    key=("stage", "snapshot_date", "source_row"),
    partition_by=("stage", "snapshot_date"),
    columns=(
        C("stage", "string", nullable=False, doc="Stage that rejected the row: `ingest`, `embed`, `score`..."),
        C("snapshot_date", "date", nullable=False, doc="Snapshot or run date the row came from."),
        C("source_uri", "string", nullable=False, doc="File or table the row was read from."),
        C("source_row", "int64", nullable=False,
          doc="Row key within the source: unique, and stable for the same source files."),
        C("product_id", "string", doc="The row's product id, when it has one."),
        C("reason_code", "string", nullable=False,
          doc="Machine-readable reasons, comma-separated when several, e.g. `empty_title,negative_price`."),
        C("reason", "string", nullable=False, doc="Human-readable reason, naming the value at fault."),
        C("raw_row", "string", nullable=False, doc="The raw row as JSON (binary fields summarised by size)."),
        C("raw_image", "binary", doc="The raw image bytes, when the row had any."),
        C("quarantined_at", "timestamp", nullable=False, doc="When the row was quarantined."),
    ),
)

PRODUCT_EMBEDDINGS = TableContract(
    name="product_embeddings",
    row_group_rows=VECTOR_ROW_GROUP_ROWS,
    doc=(
        "MOON3.0 embeddings: one row per product and model version, MERGEd by key. A row is "
        "refreshed only when the product's `content_hash` changes or the model version is new."
    ),
    key=("product_id", "model_version"),
    partition_by=("model_version",),
    columns=(
        C("product_id", "string", nullable=False, doc="Product id (products.product_id)."),
        C("model_version", "string", nullable=False, doc="Model registry version that produced the vector."),
        C("content_hash", "string", nullable=False, doc="products.content_hash the vector was computed from."),
        C("embedding", "array<float32>", nullable=False, doc="L2-normalised vector."),
        C("embedding_dim", "int32", nullable=False, doc="Length of `embedding`, equal for a model version."),
        C("attributes", "map<string,string>", doc="Attributes the model generated in its reasoning."),
        C("reasoning", "string", doc="The model's generated attribute reasoning; null when reasoning is off."),
        C("snapshot_date", "date", nullable=False, doc="Snapshot whose content was embedded."),
        C("embedded_at", "timestamp", nullable=False, doc="When the vector was computed."),
    ),
)

INDEX_VERSIONS = TableContract(
    name="index_versions",
    doc="One row per FAISS index build: what it indexes, how it was built and how well it searches.",
    key=("index_version",),
    columns=(
        C("index_version", "string", nullable=False, doc="Version folder name of the build."),
        C("model_version", "string", nullable=False, doc="Embedding model version indexed."),
        C("source_table_version", "int64", nullable=False, doc="product_embeddings Delta version read."),
        C("index_type", "string", nullable=False, doc="FAISS factory string, e.g. `HNSW32`, `IVF1024,PQ32x4fs`."),
        C("index_params", "string", nullable=False, doc="Tuned search parameters as JSON (nprobe, efSearch)."),
        C("metric", "string", nullable=False, doc="`inner_product` or `l2`."),
        C("vector_count", "int64", nullable=False, doc="Vectors in the index."),
        C("dimension", "int32", nullable=False, doc="Vector dimension."),
        C("recall_at_10", "float64", doc="Recall@10 against exact search on held-out queries."),
        C("latency_p50_ms", "float64", doc="Single-query latency, median."),
        C("latency_p99_ms", "float64", doc="Single-query latency, 99th percentile."),
        C("index_uri", "string", nullable=False, doc="Folder holding the index, id map and manifest."),
        C("status", "string", nullable=False,
          doc="`published` (CURRENT when newest), `failed` (never served: `error` says why) or `retired` (removed by retention)."),
        C("built_at", "timestamp", nullable=False, doc="When the build finished."),
        C("recall_target", "float64", doc="Recall@10 the parameters were tuned to reach."),
        C("memory_budget", "string", doc="Memory budget the index type was chosen for, e.g. `2G`."),
        C("index_bytes", "int64", doc="Size of the serialised index."),
        C("rejected_rows", "int64", doc="Embedding rows not indexed (quarantined, stage `index`)."),
        C("build_seconds", "float64", doc="Wall time of the build (sample, train, add, tune, measure)."),
        C("error", "string", doc="Why a `failed` build failed."),
    ),
)

CREATIVES = TableContract(
    name="creatives",
    row_group_rows=IMAGE_ROW_GROUP_ROWS,
    doc="AI-generated ad creatives: images of a product, with the factors they were composed from.",
    key=("creative_id",),
    columns=(
        C("creative_id", "string", nullable=False, doc="Stable id of the creative."),
        C("product_id", "string", nullable=False, doc="Product shown (products.product_id)."),
        C("product_title", "string", nullable=False, doc="Product title the creative advertises (the prompt's title)."),
        C("image_bytes", "binary", nullable=False, doc="The creative image, encoded."),
        C("factors", "map<string,string>",
          doc="Composition factors (framing, background, overlay_text, layout, brightness)."),
        C("generator", "string", doc="Tool or recipe that produced the creative."),
        C("content_hash", "string", nullable=False, doc="SHA-256 of the image bytes."),
        C("created_date", "date", nullable=False, doc="Date the creative entered the pool."),
    ),
)

USER_SEGMENTS = TableContract(
    name="user_segments",
    doc="User segments and their interests, as their high-frequency search queries.",
    key=("segment_id",),
    columns=(
        C("segment_id", "string", nullable=False, doc="Stable segment id."),
        C("name", "string", nullable=False, doc="Readable segment name."),
        C("interest_queries", "array<string>", nullable=False, doc="High-frequency queries, most frequent first."),
        C("description", "string", doc="What the segment is."),
        C("updated_date", "date", nullable=False, doc="Date the interests were last refreshed."),
    ),
)

CREATIVE_JUDGMENTS = TableContract(
    name="creative_judgments",
    doc=(
        "One row per Creative4U comparison: creative A shown first, B second, for a product and a "
        "segment, with the model's reasoning. Both orders are judged to measure position bias."
    ),
    key=("run_date", "product_id", "segment_id", "creative_a_id", "creative_b_id", "model_version"),
    partition_by=("run_date",),
    columns=(
        C("run_date", "date", nullable=False, doc="Scoring run date."),
        C("product_id", "string", nullable=False, doc="Product compared."),
        C("segment_id", "string", nullable=False, doc="User segment whose interests were in the prompt."),
        C("creative_a_id", "string", nullable=False, doc="Creative shown as image A."),
        C("creative_b_id", "string", nullable=False, doc="Creative shown as image B."),
        C("model_version", "string", nullable=False, doc="Creative4U version."),
        C("answer", "string", doc="`A`, `B`, or null when undecided (malformed output after retries)."),
        C("winner_creative_id", "string", doc="Creative chosen; null when undecided."),
        C("confidence", "float64", doc="Model probability of its answer, from its A-vs-B token probabilities."),
        C("reasoning", "string", doc="The `<think>` text."),
        C("raw_output", "string", nullable=False, doc="Full generated text of the last attempt."),
        C("error_code", "string", doc="Why undecided: the last attempt's parse error (e.g. `no_answer`); null when decided."),
        C("attempts", "int32", nullable=False, doc="Generations tried (1 + retries)."),
        C("judged_at", "timestamp", nullable=False, doc="When the comparison ran."),
    ),
)

CREATIVE_SCORES = TableContract(
    name="creative_scores",
    doc="Per run, product, segment and creative: aggregated strength, rank and the selected creative.",
    key=("run_date", "product_id", "segment_id", "creative_id", "model_version"),
    partition_by=("run_date",),
    columns=(
        C("run_date", "date", nullable=False, doc="Scoring run date."),
        C("product_id", "string", nullable=False, doc="Product."),
        C("segment_id", "string", nullable=False, doc="User segment."),
        C("creative_id", "string", nullable=False, doc="Creative scored."),
        C("model_version", "string", nullable=False, doc="Creative4U version."),
        C("strength", "float64", nullable=False, doc="Bradley-Terry log-strength (higher is better)."),
        C("win_rate", "float64", nullable=False, doc="Wins / decided comparisons."),
        C("comparisons", "int32", nullable=False, doc="Comparisons the creative took part in."),
        C("undecided", "int32", nullable=False, doc="Of which undecided."),
        C("rank", "int32", nullable=False, doc="1 = best for the product and segment."),
        C("is_selected", "bool", nullable=False,
          doc="True for the creative to serve: rank 1 and strictly stronger than rank 2 (none on a tie)."),
        C("group_hash", "string", nullable=False,
          doc="SHA-256 of what was compared (creatives and their hashes, title, segment queries); "
              "a change re-scores the group."),
        C("scored_at", "timestamp", nullable=False, doc="When the scores were computed."),
    ),
)

INTERACTIONS = TableContract(
    name="interactions",
    doc=(
        "User events for training and evaluation: search queries, impressions and clicks of products "
        "and creatives. Simulated events carry `source = 'simulated'` and the model that made them."
    ),
    key=("event_id",),
    partition_by=("event_date",),
    columns=(
        C("event_id", "string", nullable=False, doc="Unique event id."),
        C("event_date", "date", nullable=False, doc="Day of the event."),
        C("event_time", "timestamp", nullable=False, doc="Time of the event."),
        C("event_type", "string", nullable=False,
          doc="e.g. `query`, `impression`, `click`; an open set: each source documents its own."),
        C("user_id", "string", nullable=False, doc="Pseudonymous user id."),
        C("segment_id", "string", doc="User's segment."),
        C("query", "string", doc="Search query text, for `query` events and the clicks they led to."),
        C("product_id", "string", doc="Product shown or clicked."),
        C("creative_id", "string", doc="Creative shown or clicked."),
        C("position", "int32", doc="Rank position of the impression."),
        C("source", "string", nullable=False, doc="`logged` or `simulated:<model>`."),
    ),
)

MODEL_REGISTRY = TableContract(
    name="model_registry",
    doc=(
        "Every model version ever trained, its evaluation and its state. Exactly one version per "
        "model name has `is_production = true`; promotion only when the candidate beats it."
    ),
    key=("model_name", "model_version"),
    columns=(
        C("model_name", "string", nullable=False, doc="`moon3` or `creative4u`."),
        C("model_version", "string", nullable=False, doc="Version id (folder name of the checkpoint)."),
        C("checkpoint_uri", "string", nullable=False, doc="Checkpoint directory (safetensors + JSON)."),
        C("parent_version", "string", doc="Version it was trained from."),
        C("metrics", "map<string,float64>", doc="Offline evaluation metrics."),
        C("eval_report_uri", "string", doc="Evaluation report (JSON + plots)."),
        C("status", "string", nullable=False, doc="`candidate`, `production`, `rejected` or `retired`."),
        C("is_production", "bool", nullable=False, doc="True for the one version serving."),
        C("trained_at", "timestamp", nullable=False, doc="When training finished."),
        C("promoted_at", "timestamp", doc="When it became production, if it did."),
        C("notes", "string", doc="Why it was promoted or rejected."),
    ),
)

TRAINING_PRODUCTS = TableContract(
    name="training_products",
    row_group_rows=IMAGE_ROW_GROUP_ROWS,
    doc=(
        "The product corpus that training and offline evaluation read (jobs/training_data.py): live "
        "catalog products plus the Fashion-MNIST train/test images, each with a split fixed by its "
        "product id (`test` = Fashion-MNIST's test split, held out). MERGEd by `product_id`."
    ),
    key=("product_id",),
    partition_by=("split",),
    columns=(
        C("product_id", "string", nullable=False, doc="Product id (catalog id, or `FM-TR-nnnnn` / `FM-T-nnnnn`)."),
        C("split", "string", nullable=False, doc="`train`, `validation` or `test`; a function of the product id."),
        C("source", "string", nullable=False, doc="`catalog` or `fashion-mnist`."),
        C("title", "string", nullable=False, doc="Product title."),
        C("description", "string", doc="Free-text description."),
        C("category", "string", nullable=False, doc="Leaf category: the label kNN accuracy is measured on."),
        C("category_path", "string", doc="Category tree, root first, joined by ` > `."),
        C("attributes", "map<string,string>", doc="Catalog attributes (facets, options)."),
        C("image_bytes", "binary", nullable=False, doc="Main image, encoded."),
        C("reasoning_target", "string", nullable=False,
          doc="The attribute reasoning the SFT warm-up teaches, built from the catalog: `category: x; color: y`."),
        C("content_hash", "string", nullable=False, doc="SHA-256 of the fields above; a change updates the row."),
        C("exported_date", "date", nullable=False, doc="Export run that last wrote the row."),
    ),
)

MOON3_QUERY_PAIRS = TableContract(
    name="moon3_query_pairs",
    doc=(
        "MOON3.0 query->product positives: one row per (query, clicked product) of the interactions "
        "table, with the product's split. One partition per export run (rerun-safe)."
    ),
    key=("export_date", "pair_id"),
    partition_by=("export_date",),
    columns=(
        C("export_date", "date", nullable=False, doc="Export run date."),
        C("pair_id", "string", nullable=False, doc="SHA-256 of query and product id."),
        C("query", "string", nullable=False, doc="Search query text."),
        C("product_id", "string", nullable=False, doc="Clicked product (training_products.product_id)."),
        C("split", "string", nullable=False, doc="The product's split."),
        C("clicks", "int64", nullable=False, doc="Clicks on the product after this query."),
        C("matches_category", "bool", nullable=False,
          doc="Whether the query names the product's category; false marks click noise."),
    ),
)

MOON3_PRODUCT_PAIRS = TableContract(
    name="moon3_product_pairs",
    doc=(
        "MOON3.0 product<->product positives: two products of one leaf category and one split. "
        "One partition per export run."
    ),
    key=("export_date", "anchor_id"),
    partition_by=("export_date",),
    columns=(
        C("export_date", "date", nullable=False, doc="Export run date."),
        C("anchor_id", "string", nullable=False, doc="Product id."),
        C("positive_id", "string", nullable=False, doc="Another product of the same category and split."),
        C("category", "string", nullable=False, doc="Their shared leaf category."),
        C("split", "string", nullable=False, doc="Their split."),
    ),
)

TABLES: dict[str, TableContract] = {
    t.name: t
    for t in (
        CATALOG_SNAPSHOT,
        CATALOG_SNAPSHOTS,
        PRODUCTS,
        QUARANTINE,
        PRODUCT_EMBEDDINGS,
        INDEX_VERSIONS,
        CREATIVES,
        USER_SEGMENTS,
        CREATIVE_JUDGMENTS,
        CREATIVE_SCORES,
        INTERACTIONS,
        MODEL_REGISTRY,
        TRAINING_PRODUCTS,
        MOON3_QUERY_PAIRS,
        MOON3_PRODUCT_PAIRS,
    )
}


def contract(name: str) -> TableContract:
    """The contract of table ``name``, or a clear error listing the known tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"no table named {name!r}; known tables: {sorted(TABLES)}") from None


def tables_markdown() -> str:
    """docs/tables.md: every table's contract, generated from this module."""
    header = (
        "# Table contracts\n\n"
        "Generated from `schemas/tables.py` by `moonpipe schemas --markdown`; do not edit by hand.\n"
        "Writers validate against these contracts: a missing column, a changed type or a null in a\n"
        "non-nullable column fails the write with the table and column named. Extra columns are\n"
        "allowed (additive evolution).\n\n"
    )
    return header + "\n".join(t.describe() for t in TABLES.values())
