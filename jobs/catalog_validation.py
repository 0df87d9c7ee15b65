"""Great Expectations rules for a catalog snapshot: which rows to quarantine (and why), and whether
the batch as a whole can be trusted.

    annotate           helper columns the rules need (image verdicts decoded on the executors with
                       PIL, text lengths, rows sharing a product_id, ...)
    validate_snapshot  two GX suites on the annotated rows: row rules (result_format COMPLETE,
                       indexed by ``source_row``) and batch rules; row reasons are read back from
                       GX's unexpected-index lists and cross-checked against Spark counts; Data Docs
                       of the run are built into ``docs_dir``

GX is the engine that decides: every reason code is one or more expectations, and a disagreement
between GX's verdict and an independent Spark count of the same rule raises instead of
quarantining the wrong rows.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Module level on purpose: Spark evaluates the pandas UDF's type hints in this module's namespace.
import pandas as pd

from moonpipe.settings import local_path

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

LOG = logging.getLogger("moonpipe.jobs.catalog_validation")

# Java regex (Spark rlike, which GX's Spark engine uses too): a non-whitespace character, Unicode aware,
# so that an id or title of only spaces, tabs or no-break spaces counts as blank.
NOT_BLANK = r"(?U)\S"
IMAGE_STATUSES = ("ok", "missing", "undecodable", "too_large", "too_small")
REASON_CODES = (
    "missing_id",
    "duplicate_id",
    "empty_title",
    "title_too_long",
    "description_too_long",
    "negative_price",
    "missing_price",
    "image_missing",
    "image_undecodable",
    "image_too_large",
    "image_too_small",
)
# The columns GX sees: the helper columns plus what the rules read directly. Image bytes, attributes
# and long texts stay out, so the persisted frame is small and Data Docs never embed them.
GX_COLUMNS = (
    "source_row",
    "product_id",
    "title",
    "title_chars",
    "description_chars",
    "price",
    "price_value",
    "id_count",
    "is_duplicate",
    "image_status",
    "image_error",
    "image_width",
    "image_height",
)


@dataclass(frozen=True)
class ValidationLimits:
    """Thresholds of the rules; defaults suit the catalog feeds, a run may tighten or relax them."""

    max_title_chars: int = 500
    max_description_chars: int = 20_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # decompression-bomb guard: checked before decoding
    min_image_side: int = 16  # pixels
    min_row_ratio: float = 0.5  # today's rows >= 50% of the previous snapshot's
    max_duplicate_rate: float = 0.05  # share of rows whose product_id is shared with another row


@dataclass
class SnapshotValidation:
    """What ingest needs: per-row reasons to quarantine, the batch verdict, and where the report is."""

    row_reasons: dict[int, list[tuple[str, str]]]  # source_row -> [(reason_code, message naming the value)]
    batch_ok: bool
    batch_failures: list[str]  # what failed, the numbers, and what to do
    docs_index: str | None  # Data Docs index.html of the run
    statistics: dict[str, int | float] = field(default_factory=dict)
    gx_success: bool = False  # both GX suites passed (false as soon as one row is rejected)


class ValidationDisagreement(RuntimeError):
    """GX and Spark counted a rule's failures differently: the rule is broken, so no verdict is trusted."""


# -- annotate -----------------------------------------------------------------------------------------


def check_image(
    data: bytes | None, load_error: str | None, limits: ValidationLimits
) -> tuple[str, str | None, int | None, int | None]:
    """(status, message, width, height) of one encoded image.

    Size limits are checked before decoding (a small file can declare a huge canvas); "decodable"
    means PIL opens it and ``load()`` decodes every pixel, which catches truncated files."""
    from PIL import Image

    if data is None or len(data) == 0:
        if load_error:
            return "missing", f"image missing: {load_error}", None, None
        what = "image_bytes is empty (0 bytes)" if data is not None else "the row has no image bytes and no image file"
        return "missing", f"image missing: {what}", None, None
    size = len(data)
    if size > limits.max_image_bytes:
        return "too_large", f"image has {size:,} bytes, limit {limits.max_image_bytes:,}", None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            return "too_large", f"image refused as a decompression bomb ({size:,} bytes): {error}", None, None
        except Exception as error:  # noqa: BLE001 - any failure on untrusted bytes means undecodable
            message = f"image ({size:,} bytes) cannot be opened: {type(error).__name__}: {error}"
            return "undecodable", message, None, None
        with image:
            width, height = image.size
            pixels = width * height
            if pixels > limits.max_image_pixels:
                return (
                    "too_large",
                    f"image is {width}x{height} = {pixels:,} pixels, limit {limits.max_image_pixels:,}",
                    width,
                    height,
                )
            try:
                image.load()
            except Exception as error:  # noqa: BLE001
                return (
                    "undecodable",
                    (
                        f"{image.format or 'image'} {width}x{height} ({size:,} bytes) cannot be decoded fully: "
                        f"{type(error).__name__}: {error}"
                    ),
                    width,
                    height,
                )
    if min(width, height) < limits.min_image_side:
        return (
            "too_small",
            f"image is {width}x{height} pixels, below the minimum side of {limits.min_image_side} pixels",
            width,
            height,
        )
    return "ok", None, width, height


def _image_checker(limits: ValidationLimits) -> Callable[..., Column]:
    """A pandas UDF running ``check_image`` on the executors: images never travel to the driver."""
    from pyspark.sql import functions as F

    schema = "image_status string, image_error string, image_width int, image_height int"

    @F.pandas_udf(schema)  # type: ignore[call-overload]
    def check(images: pd.Series, load_errors: pd.Series) -> pd.DataFrame:
        verdicts = [
            check_image(data, error if isinstance(error, str) else None, limits)
            for data, error in zip(images, load_errors)
        ]
        frame = pd.DataFrame(verdicts, columns=["image_status", "image_error", "image_width", "image_height"])
        for column in ("image_width", "image_height"):
            frame[column] = frame[column].astype("Int32")
        return frame

    return check


def annotate(df: DataFrame, limits: ValidationLimits) -> DataFrame:
    """``df`` plus the helper columns the GX rules read, all computed on the executors.

    image_status ('ok' | 'missing' | 'undecodable' | 'too_large' | 'too_small'), image_error (the
    message naming the value), image_width/height; title_chars, description_chars; price_value
    (price with NaN as null: Spark orders NaN above every number, so a NaN would pass ``>= 0``);
    id_count (rows sharing the product_id; null when the id is blank) and is_duplicate (1/0, whose
    mean is the duplicate rate)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    load_error = F.col("image_load_error") if "image_load_error" in df.columns else F.lit(None).cast("string")
    has_id = F.col("product_id").rlike(NOT_BLANK)
    id_count = F.when(has_id, F.count(F.lit(1)).over(Window.partitionBy("product_id")))
    checked = _image_checker(limits)(F.col("image_bytes"), load_error)
    return (
        df.withColumn("_image", checked)
        .withColumns(
            {
                "image_status": F.col("_image.image_status"),
                "image_error": F.col("_image.image_error"),
                "image_width": F.col("_image.image_width"),
                "image_height": F.col("_image.image_height"),
                "title_chars": F.length("title"),
                "description_chars": F.length("description"),
                "price_value": F.when(~F.isnan("price"), F.col("price")),
                "id_count": id_count,
            }
        )
        .withColumn("is_duplicate", F.when(F.col("id_count") > 1, 1).otherwise(0))
        .drop("_image")
    )


# -- the rules ----------------------------------------------------------------------------------------


def _quoted(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _price_missing(value: Any, row: dict[str, Any]) -> str:
    return "price is NaN" if row.get("price") is not None else "price is null"


@dataclass(frozen=True)
class _RowRule:
    """One GX expectation, the reason code its failures get, the same rule as a Spark predicate
    (the cross-check), and the message for one failing row from GX's value and the row's context."""

    name: str
    code: str
    expectation: Any
    violated: Callable[[], Column]
    message: Callable[[Any, dict[str, Any]], str]


def _row_rules(limits: ValidationLimits) -> list[_RowRule]:
    import great_expectations.expectations as gxe
    from pyspark.sql import functions as F

    def col(name: str) -> Column:
        return F.col(name)

    def meta(name: str, code: str) -> dict[str, str]:
        return {"rule": name, "reason_code": code}

    return [
        _RowRule(
            "id_not_null", "missing_id",
            gxe.ExpectColumnValuesToNotBeNull(column="product_id", meta=meta("id_not_null", "missing_id"),
                                              notes="Rows without a product_id cannot be merged into products."),
            lambda: col("product_id").isNull(),
            lambda v, r: "product_id is null",
        ),
        _RowRule(
            "id_not_blank", "missing_id",
            gxe.ExpectColumnValuesToMatchRegex(column="product_id", regex=NOT_BLANK,
                                               meta=meta("id_not_blank", "missing_id"),
                                               notes="A blank product_id is as good as none."),
            lambda: col("product_id").isNotNull() & ~col("product_id").rlike(NOT_BLANK),
            lambda v, r: f"product_id is blank ({_quoted(v)})",
        ),
        _RowRule(
            "id_unique", "duplicate_id",
            gxe.ExpectColumnValuesToBeBetween(column="id_count", min_value=1, max_value=1,
                                              meta=meta("id_unique", "duplicate_id"),
                                              notes="All rows of a repeated product_id are rejected: which is right?"),
            lambda: col("id_count") > 1,
            lambda v, r: (f"product_id {_quoted(r.get('product_id'))} appears on {v} rows; ids must be unique "
                          "and it is unclear which row is right, so all of them are rejected"),
        ),
        _RowRule(
            "title_not_null", "empty_title",
            gxe.ExpectColumnValuesToNotBeNull(column="title", meta=meta("title_not_null", "empty_title")),
            lambda: col("title").isNull(),
            lambda v, r: "title is null",
        ),
        _RowRule(
            "title_not_blank", "empty_title",
            gxe.ExpectColumnValuesToMatchRegex(column="title", regex=NOT_BLANK,
                                               meta=meta("title_not_blank", "empty_title")),
            lambda: col("title").isNotNull() & ~col("title").rlike(NOT_BLANK),
            lambda v, r: f"title is blank ({_quoted(v)})",
        ),
        _RowRule(
            "title_length", "title_too_long",
            gxe.ExpectColumnValuesToBeBetween(column="title_chars", max_value=limits.max_title_chars,
                                              meta=meta("title_length", "title_too_long")),
            lambda: col("title_chars") > limits.max_title_chars,
            lambda v, r: f"title has {v:,} characters, limit {limits.max_title_chars:,}",
        ),
        _RowRule(
            "description_length", "description_too_long",
            gxe.ExpectColumnValuesToBeBetween(column="description_chars", max_value=limits.max_description_chars,
                                              meta=meta("description_length", "description_too_long")),
            lambda: col("description_chars") > limits.max_description_chars,
            lambda v, r: f"description has {v:,} characters, limit {limits.max_description_chars:,}",
        ),
        _RowRule(
            "price_not_negative", "negative_price",
            gxe.ExpectColumnValuesToBeBetween(column="price_value", min_value=0,
                                              meta=meta("price_not_negative", "negative_price")),
            lambda: col("price_value") < 0,
            lambda v, r: f"price {v} is negative",
        ),
        _RowRule(
            "price_not_null", "missing_price",
            gxe.ExpectColumnValuesToNotBeNull(column="price_value", meta=meta("price_not_null", "missing_price"),
                                              notes="price_value is price with NaN as null."),
            lambda: col("price").isNull() | F.isnan("price"),
            _price_missing,
        ),
        _RowRule(
            "image_ok", "image_*",  # the code is image_<status>, from the value GX reports
            gxe.ExpectColumnValuesToBeInSet(column="image_status", value_set=["ok"],
                                            meta=meta("image_ok", "image_<status>"),
                                            notes="image_status: each image decoded with PIL on the executors."),
            lambda: col("image_status") != "ok",
            lambda v, r: r.get("image_error") or f"image is {v}",
        ),
    ]


def _batch_expectations(limits: ValidationLimits, min_rows: int) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=min_rows, meta={"rule": "row_count"},
            notes=f"At least {limits.min_row_ratio:.0%} of the previous snapshot's rows: fewer means a partial export.",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="is_duplicate", min_value=0, max_value=limits.max_duplicate_rate, meta={"rule": "duplicate_rate"},
            notes="Share of rows whose product_id is shared with another row.",
        ),
    ]


# -- GX plumbing --------------------------------------------------------------------------------------


@contextmanager
def _quiet_gx() -> Iterator[None]:
    """GX logs metric-by-metric at INFO and warns about things we decide on purpose: keep the job log readable."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ephemeral_context(site_dir: str) -> Any:
    """An in-memory GX context whose only Data Docs site is ``site_dir`` (the default ephemeral
    context adds a temporary-folder site too), without progress bars or analytics."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            "run": {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": site_dir},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
            }
        },
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _raise_on_errors(result: Any) -> None:
    """An expectation that raised reports success=False with no counts: surface it, never read it as a verdict."""
    for item in result.results:
        info = item.exception_info or {}
        if info.get("raised_exception"):
            raise RuntimeError(
                f"GX expectation {item.expectation_config.type} {item.expectation_config.kwargs} raised: "
                f"{info.get('exception_message')}"
            )


def _docs_target(docs_dir: str) -> tuple[str, str | None]:
    """Local folder to build Data Docs into, and the remote URI to copy them to (None when local)."""
    try:
        return str(local_path(docs_dir)), None
    except ValueError:
        return tempfile.mkdtemp(prefix="moonpipe-gx-docs-"), docs_dir.rstrip("/")


def _publish_docs(local_dir: str, remote: str | None) -> str:
    index = Path(local_dir) / "index.html"
    if remote is None:
        return str(index)
    import pyarrow.fs as pafs

    from moonpipe import storage

    filesystem, path = storage.resolve(remote)
    pafs.copy_files(local_dir, path, destination_filesystem=filesystem)
    shutil.rmtree(local_dir, ignore_errors=True)
    return f"{remote}/index.html"


# -- validate -----------------------------------------------------------------------------------------


def validate_snapshot(
    df: DataFrame,
    *,
    snapshot_date: str,
    previous_rows: int | None,
    docs_dir: str,
    limits: ValidationLimits = ValidationLimits(),
) -> SnapshotValidation:
    """Run the GX row and batch suites on ``df`` (catalog_snapshot columns + ``source_row`` +
    ``image_load_error``) and turn GX's results into per-row reasons and batch verdicts.

    The annotated rows are persisted once for all expectations and released at the end; Data Docs
    of both suites are built into ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from pyspark import StorageLevel

    started = time.perf_counter()
    rows = annotate(df, limits).select(*GX_COLUMNS).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        row_count = rows.count()  # materialises the cache: images are decoded once, here
        gx_started = time.perf_counter()
        min_rows = max(1, math.ceil(round(previous_rows * limits.min_row_ratio, 9))) if previous_rows else 1
        rules = _row_rules(limits)
        site_dir, remote = _docs_target(docs_dir)
        with _quiet_gx():
            context = _ephemeral_context(site_dir)
            batch = (
                context.data_sources.add_spark(name="catalog_snapshot", persist=False)  # persisted above
                .add_dataframe_asset(name="annotated_rows")
                .add_batch_definition_whole_dataframe("snapshot")
            )
            run_id = RunIdentifier(run_name=f"snapshot-{snapshot_date}")
            results = {}
            for suite_name, expectations in (
                ("catalog_snapshot_rows", [rule.expectation for rule in rules]),
                ("catalog_snapshot_batch", _batch_expectations(limits, min_rows)),
            ):
                suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
                definition = context.validation_definitions.add(
                    gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
                )
                results[suite_name] = definition.run(
                    batch_parameters={"dataframe": rows},
                    result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["source_row"]},
                    run_id=run_id,
                )
                _raise_on_errors(results[suite_name])
            context.build_data_docs(site_names=["run"])
        docs_index = _publish_docs(site_dir, remote)
        gx_seconds = time.perf_counter() - gx_started

        failures = _row_failures(results["catalog_snapshot_rows"], rules)
        _cross_check(rows, rules, failures)
        context_rows = _failing_context(rows, {r for found in failures.values() for r, _ in found})
        row_reasons = _row_reasons(rules, failures, context_rows)
        _cross_check_total(rows, rules, row_reasons)
        duplicate_rows = sum(1 for found in row_reasons.values() if any(c == "duplicate_id" for c, _ in found))
        batch_ok, batch_failures, duplicate_rate = _batch_verdict(
            results["catalog_snapshot_batch"], snapshot_date, previous_rows, min_rows, duplicate_rows, limits
        )
    finally:
        rows.unpersist()

    statistics: dict[str, int | float] = {
        "rows": row_count,
        "rows_rejected": len(row_reasons),
        "rows_valid": row_count - len(row_reasons),
        "duplicate_rows": duplicate_rows,
        "duplicate_rate": duplicate_rate,
        "min_rows": min_rows,
        "seconds": round(time.perf_counter() - started, 2),
        "gx_seconds": round(gx_seconds, 2),
    }
    if previous_rows is not None:
        statistics["previous_rows"] = previous_rows
    for code in REASON_CODES:
        statistics[f"rejected_{code}"] = sum(
            1 for found in row_reasons.values() if any(c == code for c, _ in found)
        )
    gx_success = all(result.success for result in results.values())
    LOG.info(
        "snapshot %s: %d rows, %d rejected, batch %s (GX %.1fs)",
        snapshot_date, row_count, len(row_reasons), "ok" if batch_ok else "FAILED", gx_seconds,
    )
    return SnapshotValidation(row_reasons, batch_ok, batch_failures, docs_index, statistics, gx_success)


def _row_failures(result: Any, rules: list[_RowRule]) -> dict[str, list[tuple[int, Any]]]:
    """rule name -> [(source_row, value GX found at fault)], from each result's unexpected_index_list."""
    by_name = {rule.name: rule for rule in rules}
    failures: dict[str, list[tuple[int, Any]]] = {}
    for item in result.results:
        name = item.expectation_config.meta["rule"]
        rule = by_name[name]
        found = item.result.get("unexpected_index_list") or []
        column = item.expectation_config.kwargs["column"]
        failures[name] = [(int(entry["source_row"]), entry.get(column)) for entry in found]
        counted = item.result.get("unexpected_count")
        if counted is None and not item.result.get("element_count"):
            counted = 0  # GX reports no counts at all for an empty batch
        if counted != len(found):
            raise ValidationDisagreement(
                f"rule {rule.name} ({rule.code}): GX counted {counted} unexpected rows but listed {len(found)} of them"
            )
    missing = set(by_name) - set(failures)
    if missing:
        raise ValidationDisagreement(f"GX returned no result for rules {sorted(missing)}")
    return failures


def _cross_check(rows: DataFrame, rules: list[_RowRule], failures: dict[str, list[tuple[int, Any]]]) -> None:
    """Count each rule's failures with Spark, in one pass; any difference from GX means a broken rule."""
    from pyspark.sql import functions as F

    counts = rows.agg(
        *[F.sum(F.when(rule.violated(), 1).otherwise(0)).alias(rule.name) for rule in rules],
        F.count("source_row").alias("_keys"),
        F.count_distinct("source_row").alias("_distinct_keys"),
        F.count(F.lit(1)).alias("_rows"),
    ).first()
    if not counts["_rows"] == counts["_keys"] == counts["_distinct_keys"]:
        raise ValueError(
            f"source_row must be a unique, non-null row key: {counts['_rows']} rows, {counts['_keys']} non-null "
            f"keys, {counts['_distinct_keys']} distinct; reasons could not be told apart"
        )
    wrong = [
        f"{rule.name} ({rule.code}): GX {len(failures[rule.name])}, Spark {counts[rule.name] or 0}"
        for rule in rules
        if len(failures[rule.name]) != (counts[rule.name] or 0)
    ]
    if wrong:
        raise ValidationDisagreement("GX and Spark disagree on failing rows: " + "; ".join(wrong))


def _failing_context(rows: DataFrame, failing: set[int]) -> dict[int, dict[str, Any]]:
    """product_id, raw price and image message of the failing rows only, for their messages."""
    from pyspark.sql import functions as F

    if not failing:
        return {}
    picked = rows.where(F.col("source_row").isin(sorted(failing))).select(
        "source_row", "product_id", "price", "image_error"
    )
    return {row["source_row"]: row.asDict() for row in picked.collect()}


def _row_reasons(
    rules: list[_RowRule],
    failures: dict[str, list[tuple[int, Any]]],
    context_rows: dict[int, dict[str, Any]],
) -> dict[int, list[tuple[str, str]]]:
    reasons: dict[int, list[tuple[str, str]]] = {}
    for rule in rules:  # rule order fixes the order of a row's codes
        for source_row, value in failures[rule.name]:
            code = f"image_{value}" if rule.code == "image_*" else rule.code
            found = reasons.setdefault(source_row, [])
            if all(c != code for c, _ in found):
                found.append((code, rule.message(value, context_rows.get(source_row, {}))))
    return dict(sorted(reasons.items()))


def _cross_check_total(rows: DataFrame, rules: list[_RowRule], reasons: dict[int, list[tuple[str, str]]]) -> None:
    from functools import reduce

    any_violated = reduce(lambda a, b: a | b, [rule.violated() for rule in rules])
    spark_rejected = rows.where(any_violated).count()
    if spark_rejected != len(reasons):
        raise ValidationDisagreement(
            f"GX rejects {len(reasons)} rows but Spark finds {spark_rejected} rows breaking a rule"
        )
    unknown = {code for found in reasons.values() for code, _ in found} - set(REASON_CODES)
    if unknown:
        raise ValidationDisagreement(f"rules produced unknown reason codes {sorted(unknown)}")


def _batch_verdict(
    result: Any,
    snapshot_date: str,
    previous_rows: int | None,
    min_rows: int,
    duplicate_rows: int,
    limits: ValidationLimits,
) -> tuple[bool, list[str], float]:
    """(batch_ok, messages, duplicate rate) from the batch suite's results."""
    failures: list[str] = []
    duplicate_rate = 0.0
    for item in result.results:
        rule = item.expectation_config.meta["rule"]
        observed = item.result.get("observed_value")
        if rule == "row_count":
            rows = int(observed or 0)
            if item.success:
                continue
            if previous_rows:
                failures.append(
                    f"snapshot {snapshot_date} has {rows} rows, fewer than {limits.min_row_ratio:.0%} of the previous "
                    f"snapshot's {previous_rows} (at least {min_rows} expected): a partial export? Re-export it, "
                    f"or lower min_row_ratio if the catalog really shrank"
                )
            else:
                failures.append(
                    f"snapshot {snapshot_date} has {rows} rows: an empty or failed export? Re-export it"
                )
        elif rule == "duplicate_rate":
            duplicate_rate = float(observed or 0.0)
            if not item.success and observed is not None:  # None: no rows, which row_count reports
                failures.append(
                    f"snapshot {snapshot_date}: {duplicate_rows} rows ({duplicate_rate:.1%}) share their product_id "
                    f"with another row, over the {limits.max_duplicate_rate:.1%} limit: the export likely repeated "
                    f"rows or ids were reused. Fix the export so that ids are unique, or raise max_duplicate_rate "
                    f"if this is expected"
                )
    return not failures, failures, duplicate_rate
