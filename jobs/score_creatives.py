"""Score creatives with Creative4U: for every product and user segment whose creatives (or
interests) are new or changed, rank the creatives with few comparisons and select the best.

    reader    creatives x user_segments -> one group per (product, segment) with a group hash over
              what the model reads; groups whose hash the model version already scored on an
              earlier run are skipped (all with ``full``)
    model     an Arrow UDF over partitions of whole groups: the judge is built once per executor
              Python worker; each creative image is checked first (an unreadable one is set
              aside for quarantine); the groups' schedules (jobs.creative_ranking) run in
              lock-step so each model batch serves every group of the partition; each pair is
              judged in both orders; scores are aggregated on the spot (Bradley–Terry)
    writers   creative_judgments and creative_scores: MERGE by key within (run date, model
              version), rows a rerun no longer produces removed; quarantine (stage ``score``)

A conservation check fails the run unless every (group, creative) ends scored or quarantined.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from moonpipe import delta
from moonpipe.progress import stage
from moonpipe.settings import Settings
from schemas.tables import CREATIVE_JUDGMENTS, CREATIVE_SCORES, CREATIVES, QUARANTINE, USER_SEGMENTS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

LOG = logging.getLogger("moonpipe.jobs.score_creatives")
STAGE = "score"
KINDS = ("judgment", "score", "rejected")
# One output schema for the three kinds of row the UDF emits (a tagged union: columns that do
# not apply to a kind are null).
UDF_OUTPUT = pa.schema(
    [
        ("kind", pa.string()),
        ("product_id", pa.string()),
        ("segment_id", pa.string()),
        ("group_hash", pa.string()),
        ("creative_id", pa.string()),  # score, rejected
        ("creative_a_id", pa.string()),  # judgment
        ("creative_b_id", pa.string()),
        ("answer", pa.string()),
        ("winner_creative_id", pa.string()),
        ("confidence", pa.float64()),
        ("reasoning", pa.string()),
        ("raw_output", pa.string()),
        ("attempts", pa.int32()),
        ("error_code", pa.string()),  # judgment (undecided), rejected
        ("error", pa.string()),
        ("strength", pa.float64()),  # score
        ("win_rate", pa.float64()),
        ("comparisons", pa.int32()),
        ("undecided", pa.int32()),
        ("rank", pa.int32()),
        ("is_selected", pa.bool_()),
    ]
)
MODEL_COLUMNS = ("product_id", "segment_id", "group_hash", "product_title", "interest_queries", "creative_id", "image_bytes")

_JUDGES: dict[tuple, Any] = {}  # one judge per executor Python worker, model and options


class ConservationError(RuntimeError):
    """A creative of a scored group ended neither scored nor quarantined."""


@dataclass
class ScoreSummary:
    run_date: str
    model_version: str
    decoding: str | None
    full: bool
    groups: int = 0
    groups_scored: int = 0
    groups_unchanged: int = 0
    creatives_in_groups: int = 0  # (group, creative) rows to score
    scored: int = 0  # creative_scores rows written
    selected: int = 0
    quarantined: int = 0  # distinct creatives with an unreadable image
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    comparisons: int = 0
    undecided: int = 0
    all_pairs_comparisons: int = 0  # what judging every ordered pair would have cost
    comparisons_per_second: float | None = None  # measured over the model stage
    table_versions: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_version(model_dir: str) -> str:
    from model.creative4u_checkpoint import read_manifest

    return read_manifest(model_dir)["model_version"]


def _judge(model_dir: str, options: tuple[tuple[str, Any], ...]) -> Any:
    key = (model_dir, options)
    if key not in _JUDGES:
        from model.creative4u_predictor import make_judge_fn

        _JUDGES[key] = make_judge_fn(model_dir, **dict(options))
    return _JUDGES[key]


def _output(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=UDF_OUTPUT)


def score_groups(rows: list[dict], judge: Any, refine: bool = True) -> list[dict]:
    """Score whole groups (rows of MODEL_COLUMNS, any order): rejected, judgment and score rows."""
    from jobs.creative_ranking import JudgedComparison, aggregate, drive, pair_preference
    from model.creative4u import Comparison, CreativeRejected, decode_creative
    from model.creative4u_protocol import PairPrompt

    out: list[dict] = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["product_id"], row["segment_id"]), []).append(row)
    images: dict[tuple, bytes] = {}
    valid: dict[tuple[str, str], list[str]] = {}
    prompts: dict[tuple[str, str], PairPrompt] = {}
    for key, members in groups.items():
        members.sort(key=lambda r: r["creative_id"])
        first = members[0]
        prompts[key] = PairPrompt(first["product_title"], tuple(first["interest_queries"] or ()))
        valid[key] = []
        for row in members:
            try:
                decode_creative(row["image_bytes"], f"creative {row['creative_id']}")
            except CreativeRejected as rejected:
                out.append({"kind": "rejected", "product_id": key[0], "segment_id": key[1], "group_hash": row["group_hash"],
                            "creative_id": row["creative_id"], "error_code": rejected.code, "error": str(rejected)})
                continue
            valid[key].append(row["creative_id"])
            images[(key, row["creative_id"])] = row["image_bytes"]

    recorded: dict[tuple[str, str], list[tuple[str, str, Any]]] = {key: [] for key in groups}

    def judge_round(requests: list[tuple[Any, tuple[str, str]]]) -> dict:
        ordered = [(key, x, y) for key, (x, y) in requests] + [(key, y, x) for key, (x, y) in requests]
        verdicts = judge([Comparison(prompts[key], images[(key, a)], images[(key, b)]) for key, a, b in ordered])
        by_order = {}
        for (key, a, b), verdict in zip(ordered, verdicts):
            recorded[key].append((a, b, verdict))
            by_order[(key, a, b)] = verdict.prob_a if verdict.answer is not None else None
        return {(key, (x, y)): pair_preference(by_order[(key, x, y)], by_order[(key, y, x)]) for key, (x, y) in requests}

    drive(((key, items) for key, items in valid.items()), judge_round, refine)

    for key, members in groups.items():
        group_hash = members[0]["group_hash"]
        judged = []
        for a, b, verdict in recorded[key]:
            winner = None if verdict.answer is None else (a if verdict.answer == "A" else b)
            out.append({
                "kind": "judgment", "product_id": key[0], "segment_id": key[1], "group_hash": group_hash,
                "creative_a_id": a, "creative_b_id": b, "answer": verdict.answer, "winner_creative_id": winner,
                "confidence": verdict.confidence, "reasoning": verdict.reasoning, "raw_output": verdict.raw_output,
                "attempts": verdict.attempts, "error_code": verdict.error_code, "error": verdict.error,
            })
            judged.append(JudgedComparison(a, b, verdict.answer, verdict.prob_a))
        if not valid[key]:
            continue
        for score in aggregate(valid[key], judged):
            out.append({
                "kind": "score", "product_id": key[0], "segment_id": key[1], "group_hash": group_hash,
                "creative_id": score.creative_id, "strength": score.strength, "win_rate": score.win_rate,
                "comparisons": score.comparisons, "undecided": score.undecided, "rank": score.rank,
                "is_selected": score.is_selected,
            })
    return out


def score_partition(
    batches: Iterator[pa.RecordBatch], model_dir: str, options: tuple[tuple[str, Any], ...], groups_per_round: int, refine: bool
) -> Iterator[pa.RecordBatch]:
    """The Arrow UDF body. Rows arrive sorted by group; up to ``groups_per_round`` whole groups
    are scored together, so memory stays bounded and model batches stay full."""
    judge = None
    pending: list[dict] = []
    keys: list[tuple[str, str]] = []
    for batch in batches:
        for row in batch.to_pylist():
            key = (row["product_id"], row["segment_id"])
            if not keys or keys[-1] != key:
                if len(keys) == groups_per_round:
                    judge = judge or _judge(model_dir, options)
                    yield _output(score_groups(pending, judge, refine))
                    pending, keys = [], []
                keys.append(key)
            pending.append(row)
    if pending:
        judge = judge or _judge(model_dir, options)
        yield _output(score_groups(pending, judge, refine))


def groups_to_score(
    spark: "SparkSession", settings: Settings, version: str, run_date: date, full: bool
) -> tuple["DataFrame", "DataFrame"]:
    """(every (product, segment) group with its hash, the group rows to score: MODEL_COLUMNS).

    A group is scored when this model version has no earlier run (before ``run_date``) with the
    same group hash: a new or changed creative, a new title or changed interests re-score it."""
    from pyspark.sql import functions as F

    creatives = delta.read(spark, settings.table_uri(CREATIVES.name)).select(
        "creative_id", "product_id", "product_title", "content_hash", "image_bytes"
    )
    segments = delta.read(spark, settings.table_uri(USER_SEGMENTS.name)).select("segment_id", "interest_queries")
    members = creatives.drop("image_bytes").crossJoin(F.broadcast(segments))
    groups = members.groupBy("product_id", "segment_id").agg(
        F.sha2(
            F.concat_ws(
                "|",
                F.concat_ws(",", F.array_sort(F.collect_list(F.concat_ws(":", "creative_id", "content_hash")))),
                F.max("product_title"),
                F.concat_ws(";", F.first("interest_queries")),
            ),
            256,
        ).alias("group_hash"),
        F.count("*").alias("creatives"),
    )
    todo = groups
    scores_uri = settings.table_uri(CREATIVE_SCORES.name)
    if not full and delta.exists(scores_uri):
        done = (
            delta.read(spark, scores_uri)
            .where((F.col("model_version") == version) & (F.col("run_date") < F.lit(run_date)))
            .select("product_id", "segment_id", "group_hash")
            .distinct()
        )
        todo = groups.join(done, ["product_id", "segment_id", "group_hash"], "left_anti")
    rows = (
        creatives.crossJoin(F.broadcast(segments))
        .join(todo.select("product_id", "segment_id", "group_hash"), ["product_id", "segment_id"])
        .select(*MODEL_COLUMNS)
    )
    return groups, rows


def _replace_run_rows(frame: "DataFrame", uri: str, contract, run_date: date, version: str, meta: dict) -> int:
    """MERGE this run's rows by key within (run_date, model_version) and delete the rows of that
    run and version that this run no longer produced; returns the table version."""
    from pyspark.sql import functions as F

    scope = f"t.run_date = DATE '{run_date.isoformat()}' AND t.model_version = '{version}'"
    if frame.limit(1).count():
        delta.merge(frame, uri, contract, delta.MergeSpec(extra_predicate=scope), metadata=meta)
    table = delta.ensure_table(uri, contract)
    key = list(contract.key)
    stale = (
        delta.read(frame.sparkSession, uri)
        .where((F.col("run_date") == F.lit(run_date)) & (F.col("model_version") == version))
        .join(frame.select(*key), key, "left_anti")
    )
    if stale.limit(1).count():
        delta.merge(
            stale, uri, contract,
            delta.MergeSpec(update=False, insert=False, delete_matched_condition="true", extra_predicate=scope),
            metadata=meta,
        )
    table.update_incremental()
    return table.version()


def score_creatives(
    run_date: date,
    settings: Settings | None = None,
    spark: "SparkSession | None" = None,
    model_dir: str | None = None,
    *,
    full: bool = False,
    decoding: str | None = None,
    device: str | None = None,
    max_batch: int = 16,
    groups_per_round: int = 64,
    refine: bool = True,
    threads_per_task: int | None = None,
) -> ScoreSummary:
    """Score the new and changed (product, segment) groups of ``run_date`` (all with ``full``)
    with the Creative4U checkpoint at ``model_dir`` (default: Settings.creative_model)."""
    from functools import partial

    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from jobs.ingest import quarantine_frame
    from moonpipe.spark_session import get_spark

    settings = settings or Settings.from_env()
    model_dir = model_dir or settings.creative_model
    version = model_version(model_dir)
    spark = spark or get_spark()
    for table in (CREATIVES, USER_SEGMENTS):
        if not delta.exists(settings.table_uri(table.name)):
            raise FileNotFoundError(
                f"table {table.name!r} does not exist under {settings.lake_uri}: load creatives and segments first "
                f"(samples: `moonpipe creatives build-data --date {run_date}`)"
            )
    from pathlib import Path

    saved = json.loads((Path(model_dir) / "creative4u_config.json").read_text())
    summary = ScoreSummary(run_date.isoformat(), version, decoding or saved["decoding"], full)
    threads = threads_per_task or int(spark.conf.get("spark.task.cpus", "1"))
    options = tuple(sorted({"decoding": decoding, "device": device, "threads": threads, "max_batch": max_batch}.items()))
    meta = {"moonpipe.job": "score_creatives", "moonpipe.run_date": run_date.isoformat(), "moonpipe.model_version": version}

    clock = time.perf_counter()
    with stage(f"score {run_date}: select new and changed groups", LOG) as record:
        groups, rows = groups_to_score(spark, settings, version, run_date, full)
        rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
        sizes = {(r.product_id, r.segment_id): r.creatives for r in groups.collect()}
        summary.groups = len(sizes)
        todo = rows.groupBy("product_id", "segment_id").count().collect()
        summary.groups_scored = len(todo)
        summary.groups_unchanged = summary.groups - summary.groups_scored
        summary.creatives_in_groups = record.rows = sum(r["count"] for r in todo)
        summary.all_pairs_comparisons = sum(r["count"] * (r["count"] - 1) for r in todo)
    summary.seconds["select"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    with stage(f"score {run_date}: Creative4U {version}", LOG) as record:
        partitions = max(1, min(spark.sparkContext.defaultParallelism, summary.groups_scored))
        outputs = (
            rows.repartition(partitions, "product_id", "segment_id")
            .sortWithinPartitions("product_id", "segment_id", "creative_id")
            .mapInArrow(
                partial(score_partition, model_dir=model_dir, options=options, groups_per_round=groups_per_round, refine=refine),
                from_arrow_schema(UDF_OUTPUT),
            )
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        counts = {r.kind: r["count"] for r in outputs.groupBy("kind").count().collect()}
        summary.comparisons = record.rows = counts.get("judgment", 0)
    model_seconds = time.perf_counter() - clock
    summary.seconds["model"] = round(model_seconds, 2)
    if summary.comparisons:
        summary.comparisons_per_second = round(summary.comparisons / model_seconds, 2)

    clock = time.perf_counter()
    now = datetime.now(timezone.utc)
    with stage(f"score {run_date}: write", LOG):
        judgments = outputs.where(F.col("kind") == "judgment").select(
            F.lit(run_date).alias("run_date"), "product_id", "segment_id", "creative_a_id", "creative_b_id",
            F.lit(version).alias("model_version"), "answer", "winner_creative_id", "confidence", "reasoning",
            "raw_output", "attempts", "error_code", F.lit(now).alias("judged_at"),
        )
        summary.undecided = judgments.where(F.col("answer").isNull()).count()
        summary.table_versions[CREATIVE_JUDGMENTS.name] = _replace_run_rows(
            judgments, settings.table_uri(CREATIVE_JUDGMENTS.name), CREATIVE_JUDGMENTS, run_date, version, meta
        )
        scores = outputs.where(F.col("kind") == "score").select(
            F.lit(run_date).alias("run_date"), "product_id", "segment_id", "creative_id",
            F.lit(version).alias("model_version"), "strength", "win_rate", "comparisons", "undecided", "rank",
            "is_selected", "group_hash", F.lit(now).alias("scored_at"),
        )
        summary.table_versions[CREATIVE_SCORES.name] = _replace_run_rows(
            scores, settings.table_uri(CREATIVE_SCORES.name), CREATIVE_SCORES, run_date, version, meta
        )
        summary.scored = counts.get("score", 0)
        summary.selected = scores.where("is_selected").count()

        rejected = outputs.where(F.col("kind") == "rejected").select("creative_id", "error_code", "error").distinct().collect()
        reasons: dict[int, list[tuple[str, str]]] = {}
        bad = {r.creative_id: r for r in rejected}
        for r in bad.values():
            summary.quarantine_reasons[r.error_code] = summary.quarantine_reasons.get(r.error_code, 0) + 1
        keyed = (
            delta.read(spark, settings.table_uri(CREATIVES.name))
            .where(F.col("creative_id").isin(list(bad)) if bad else F.lit(False))
            .withColumn("source_row", F.xxhash64("creative_id"))
        )
        for r in keyed.select("source_row", "creative_id").collect():
            reasons[r.source_row] = [(bad[r.creative_id].error_code, bad[r.creative_id].error)]
        quarantined = delta.write(
            quarantine_frame(spark, keyed, reasons, stage_name=STAGE, snapshot_date=run_date,
                             source_uri=settings.table_uri(CREATIVES.name)),
            settings.table_uri(QUARANTINE.name), QUARANTINE, mode="overwrite",
            replace_where={"stage": STAGE, "snapshot_date": run_date}, metadata=meta,
        )
        summary.quarantined = quarantined.rows_written
        summary.table_versions[QUARANTINE.name] = quarantined.version
        rejected_rows = counts.get("rejected", 0)
    summary.seconds["write"] = round(time.perf_counter() - clock, 2)
    outputs.unpersist()
    rows.unpersist()

    if summary.scored + rejected_rows != summary.creatives_in_groups:
        raise ConservationError(
            f"score {run_date}: {summary.creatives_in_groups} (group, creative) rows to score, but {summary.scored} "
            f"scored + {rejected_rows} rejected = {summary.scored + rejected_rows}: rerun "
            f"`moonpipe score-creatives --date {run_date}`"
        )
    LOG.info("score %s: %s", run_date, json.dumps(summary.as_dict()))
    return summary
