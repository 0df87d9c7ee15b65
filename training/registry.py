"""The model_registry Delta table: every version trained, its evaluation, which one is production.

All changes are MERGEs by (model_name, model_version) in one commit each, so a promotion (the
candidate up, the old production retired) is atomic: readers never see two or zero production rows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from moonpipe import delta
from moonpipe.settings import Settings
from schemas.tables import MODEL_REGISTRY


def _uri(settings: Settings) -> str:
    return settings.table_uri("model_registry")


def rows(settings: Settings, model_name: str) -> list[dict[str, Any]]:
    uri = _uri(settings)
    if not delta.exists(uri):
        return []
    table = delta.read_arrow(uri, filters=[("model_name", "=", model_name)])
    result = table.to_pylist()
    for row in result:
        row["metrics"] = dict(row["metrics"] or [])
    return sorted(result, key=lambda r: r["trained_at"])


def get(settings: Settings, model_name: str, model_version: str) -> dict[str, Any] | None:
    return next((r for r in rows(settings, model_name) if r["model_version"] == model_version), None)


def production(settings: Settings, model_name: str) -> dict[str, Any] | None:
    live = [r for r in rows(settings, model_name) if r["is_production"]]
    if len(live) > 1:
        raise RuntimeError(f"model_registry holds {len(live)} production versions of {model_name!r}: "
                           f"{[r['model_version'] for r in live]}; fix the table before promoting")
    return live[0] if live else None


def upsert(settings: Settings, records: list[dict[str, Any]]) -> int:
    """MERGE full rows (every contract column) by key, in one commit; returns the table version."""
    table = pa.Table.from_pylist(
        [{**r, "metrics": list((r.get("metrics") or {}).items())} for r in records],
        schema=MODEL_REGISTRY.arrow_schema(),
    )
    return delta.merge(table, _uri(settings), MODEL_REGISTRY).version


def record_candidate(
    settings: Settings, model_name: str, model_version: str, checkpoint_uri: str, *,
    parent_version: str | None, metrics: dict[str, float], eval_report_uri: str | None,
    trained_at: datetime | None = None,
) -> dict[str, Any]:
    """Add (or refresh the evaluation of) a version. A known version keeps its status."""
    existing = get(settings, model_name, model_version)
    row = existing or {
        "model_name": model_name, "model_version": model_version, "checkpoint_uri": checkpoint_uri,
        "parent_version": parent_version, "status": "candidate", "is_production": False,
        "trained_at": trained_at or datetime.now(timezone.utc), "promoted_at": None, "notes": None,
    }
    row = {**row, "metrics": metrics, "eval_report_uri": eval_report_uri}
    upsert(settings, [row])
    return row
