"""Offline evaluation: a candidate against the current production model, side by side on one held-out set.

    evaluate("moon3", candidate="var/models/moon3/runs/r1/model")

Both models are measured in the same call on the same data, so promotion compares like with like.
The report (``<reports_dir>/evaluation/<model>/<candidate version>/<UTC time>/report.json`` and
``metrics.png``) holds both sets of metrics and the baseline's version; the candidate's metrics
and the report's location are recorded in ``model_registry`` (status ``candidate`` for a new version).
Each evaluation gets its own folder and no report is ever rewritten: the one the registry points
to, which promotion reads, stays what was recorded when another evaluation (``record=False``,
other options) of the same version follows.
Model kinds plug in through ``EVALUATORS``: a function (candidate dir, baseline dir or None,
settings, options) -> {"candidate": {...}, "baseline": {...} or None, "headline": [metric names]}.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moonpipe.settings import Settings, local_path
from training import registry

LOG = logging.getLogger("moonpipe.training.evaluate")


def _evaluate_moon3(candidate: str, baseline: str | None, settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    from training.moon3_eval import evaluate_checkpoint, load_eval_set, raw_pixel_knn

    threads = options.pop("threads", None)
    k = options.pop("k", 10)
    reasoning = options.pop("reasoning", None)  # None: each model's own setting, as the embed job runs it
    eval_set = load_eval_set(settings, **options)
    result = {"candidate": evaluate_checkpoint(candidate, eval_set, k=k, threads=threads, reasoning=reasoning)}
    result["baseline"] = (evaluate_checkpoint(baseline, eval_set, k=k, threads=threads, reasoning=reasoning)
                          if baseline else None)
    result["reference"] = {"raw_pixel_knn_accuracy": raw_pixel_knn(eval_set, k)}
    result["headline"] = ["knn_accuracy", "p2p_recall@1", "p2p_recall@5", "p2p_recall@10", "p2p_map@100",
                          "q2p_recall@1", "q2p_recall@5", "q2p_recall@10", "q2p_map@100"]
    return result


def _evaluate_creative4u(candidate: str, baseline: str | None, settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    from training.creative4u_trainer import evaluate_pairs

    return evaluate_pairs(candidate, baseline, settings, options)


EVALUATORS = {"moon3": _evaluate_moon3, "creative4u": _evaluate_creative4u}


def _manifest(model_kind: str, directory: str) -> dict[str, Any]:
    if model_kind == "moon3":
        from model.moon3_checkpoint import verify_checkpoint
    else:
        from model.creative4u_checkpoint import verify_checkpoint
    return verify_checkpoint(directory)


def _new_report_folder(version_folder: Path, evaluated_at: datetime) -> Path:
    """A folder of its own for one evaluation, named by its UTC time (sorted = chronological)."""
    stamp = evaluated_at.strftime("%Y%m%dT%H%M%S.%fZ")
    folder, taken = version_folder / stamp, 0
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # another process, the same microsecond
            taken += 1
            folder = version_folder / f"{stamp}-{taken}"


def evaluate(
    model_kind: str,
    candidate: str,
    *,
    baseline: str | None = "production",
    settings: Settings | None = None,
    record: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``candidate`` (a checkpoint directory) against ``baseline`` ("production": the
    registry's production version, if any; a directory; or None). Returns the JSON-able report."""
    if model_kind not in EVALUATORS:
        raise ValueError(f"no evaluator for model kind {model_kind!r}; known: {sorted(EVALUATORS)}")
    settings = settings or Settings.from_env()
    manifest = _manifest(model_kind, candidate)
    version = manifest["model_version"]
    baseline_version = None
    if baseline == "production":
        live = registry.production(settings, model_kind)
        baseline = live["checkpoint_uri"] if live else None
        baseline_version = live["model_version"] if live else None
    elif baseline is not None:
        baseline_version = _manifest(model_kind, baseline)["model_version"]
    if baseline_version == version:
        baseline = baseline_version = None  # the candidate is production already: nothing to compare
    LOG.info("evaluating %s %s against %s", model_kind, version, baseline_version or "no baseline")
    result = EVALUATORS[model_kind](candidate, baseline, settings, dict(options))
    evaluated_at = datetime.now(timezone.utc)
    folder = _new_report_folder(local_path(settings.reports_dir) / "evaluation" / model_kind / version, evaluated_at)
    report = {
        "model_kind": model_kind,
        "candidate_version": version,
        "candidate_dir": str(candidate),
        "baseline_version": baseline_version,
        "baseline_dir": str(baseline) if baseline else None,
        "evaluated_at": evaluated_at.isoformat(),
        "options": {k: v for k, v in options.items()},
        **result,
    }
    from training.report_plots import grouped_bars

    series = {f"candidate {version}": result["candidate"]["metrics"]}
    if result.get("baseline"):
        series[f"production {baseline_version}"] = result["baseline"]["metrics"]
    plot = grouped_bars(folder / "metrics.png", f"{model_kind} offline evaluation", series, result["headline"])
    report["plots"] = [str(plot)]
    report_path = folder / "report.json"
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    report["report_uri"] = str(report_path)
    if record:
        registry.record_candidate(
            settings, model_kind, version, str(candidate), parent_version=manifest.get("parent_version"),
            metrics={k: float(v) for k, v in result["candidate"]["metrics"].items()},
            eval_report_uri=str(report_path),
        )
    return report
