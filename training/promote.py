"""The promotion gate: a candidate becomes production only when it beats production by a margin.

The comparison uses the candidate's evaluation report, in which candidate and production were
measured side by side on the same held-out set; a report made against another production version
(production changed since) is refused: evaluate again. With no production yet, the first evaluated
candidate is promoted (there is nothing to beat). Promotion, retirement of the old production
version and the rejection of a worse candidate are each one Delta commit on ``model_registry``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moonpipe.settings import Settings
from training import registry

DEFAULT_METRIC = {"moon3": "knn_accuracy", "creative4u": "pair_accuracy"}


class PromotionRefused(RuntimeError):
    """The gate cannot decide (no evaluation, stale comparison); the message says what to run."""


def promote(
    model_kind: str,
    model_version: str | None = None,
    *,
    metric: str | None = None,
    margin: float = 0.005,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Promote ``model_version`` (default: the newest candidate) if ``metric`` beats production by
    ``margin`` (absolute). Returns {"promoted": bool, "reason": ..., versions, values}."""
    settings = settings or Settings.from_env()
    metric = metric or DEFAULT_METRIC.get(model_kind)
    if metric is None:
        raise ValueError(f"no default gate metric for {model_kind!r}: pass metric=")
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0")
    rows = registry.rows(settings, model_kind)
    if model_version is None:
        candidates = [r for r in rows if r["status"] == "candidate"]
        if not candidates:
            raise PromotionRefused(f"no {model_kind} candidate in model_registry: train and evaluate one first")
        row = candidates[-1]
    else:
        row = next((r for r in rows if r["model_version"] == model_version), None)
        if row is None:
            raise PromotionRefused(f"{model_kind} {model_version} is not in model_registry: evaluate it first "
                                   f"(`moonpipe evaluate --kind {model_kind} --candidate DIR`)")
    if row["is_production"]:
        return {"promoted": False, "reason": "already production", "model_version": row["model_version"]}
    if not row["eval_report_uri"] or not Path(row["eval_report_uri"]).is_file():
        raise PromotionRefused(f"{row['model_version']} has no evaluation report: evaluate it first")
    report = json.loads(Path(row["eval_report_uri"]).read_text())
    live = registry.production(settings, model_kind)
    now = datetime.now(timezone.utc)
    candidate_value = report["candidate"]["metrics"].get(metric)
    if candidate_value is None:
        raise PromotionRefused(f"metric {metric!r} is not in the evaluation report; it has "
                               f"{sorted(report['candidate']['metrics'])}")
    decision: dict[str, Any] = {"model_kind": model_kind, "model_version": row["model_version"], "metric": metric,
                                "margin": margin, "candidate_value": candidate_value}
    if live is None:
        decision.update(promoted=True, production_version=None, production_value=None,
                        reason="no production version yet: the first evaluated candidate is promoted")
        registry.upsert(settings, [{**row, "status": "production", "is_production": True, "promoted_at": now,
                                    "notes": decision["reason"]}])
        return decision
    if report.get("baseline_version") != live["model_version"] or not report.get("baseline"):
        raise PromotionRefused(
            f"the report of {row['model_version']} compares against {report.get('baseline_version')!r}, but "
            f"production is {live['model_version']}: evaluate the candidate again against production"
        )
    production_value = report["baseline"]["metrics"][metric]
    decision.update(production_version=live["model_version"], production_value=production_value)
    if candidate_value >= production_value + margin:
        decision.update(promoted=True, reason=f"{metric} {candidate_value:.4f} >= production "
                                              f"{production_value:.4f} + margin {margin}")
        registry.upsert(settings, [
            {**row, "status": "production", "is_production": True, "promoted_at": now, "notes": decision["reason"]},
            {**live, "status": "retired", "is_production": False,
             "notes": f"replaced by {row['model_version']} on {now.date().isoformat()}"},
        ])
    else:
        decision.update(promoted=False, reason=f"{metric} {candidate_value:.4f} < production "
                                               f"{production_value:.4f} + margin {margin}")
        registry.upsert(settings, [{**row, "status": "rejected", "is_production": False, "notes": decision["reason"]}])
    return decision
