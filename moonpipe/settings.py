"""Where things live. One base setting, ``MOONPIPE_HOME``, places every table, snapshot and temp
folder; each can be overridden separately (e.g. the lake on object storage) with its own variable.

Values are URIs or local paths: ``s3://bucket/lake`` works wherever delta-rs and Spark can reach it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The local path of a ``file://`` URI or plain path; a clear error for a remote URI."""
    if not _is_local(uri):
        raise ValueError(f"{uri!r} is not a local path; this operation needs a local folder")
    return Path(uri.removeprefix("file://"))


@dataclass(frozen=True)
class Settings:
    """Locations of the pipeline's data. Build with ``Settings.from_env()``."""

    home: str
    lake_uri: str
    snapshots_uri: str
    raw_data_dir: str
    tmp_dir: str
    spark_profile: str
    moon3_model: str
    # FAISS index versions (one folder per build plus a CURRENT pointer) of the search teams.
    index_uri: str
    # Model checkpoints: candidates written by training, the production one named in model_registry.
    models_dir: str
    creative_model: str
    # Run outputs for people: Data Docs, evaluation reports, plots.
    reports_dir: str

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> "Settings":
        base = str(home or os.environ.get("MOONPIPE_HOME") or PROJECT_ROOT / "var")
        base = base.rstrip("/")
        return cls(
            home=base,
            lake_uri=os.environ.get("MOONPIPE_LAKE_URI", f"{base}/lake").rstrip("/"),
            snapshots_uri=os.environ.get("MOONPIPE_SNAPSHOTS_URI", f"{base}/snapshots").rstrip("/"),
            raw_data_dir=os.environ.get("MOONPIPE_RAW_DATA", str(PROJECT_ROOT / "data" / "raw")),
            tmp_dir=os.environ.get("MOONPIPE_TMP", f"{base}/tmp"),
            spark_profile=os.environ.get("MOONPIPE_SPARK_PROFILE", "local"),
            moon3_model=os.environ.get("MOONPIPE_MOON3_MODEL", f"{base}/models/moon3/bootstrap"),
            index_uri=os.environ.get("MOONPIPE_INDEX_URI", f"{base}/indexes").rstrip("/"),
            models_dir=os.environ.get("MOONPIPE_MODELS", f"{base}/models").rstrip("/"),
            creative_model=os.environ.get("MOONPIPE_CREATIVE_MODEL", f"{base}/models/creative4u/bootstrap"),
            reports_dir=os.environ.get("MOONPIPE_REPORTS", f"{base}/reports").rstrip("/"),
        )

    def table_uri(self, table: str) -> str:
        """URI of Delta table ``table`` in the lake."""
        from schemas import contract

        if not contract(table).is_delta_table:
            raise ValueError(f"{table!r} is an input format, not a Delta table of the lake")
        return f"{self.lake_uri}/{table}"

    def snapshot_uri(self, snapshot_date: str) -> str:
        """Folder of the catalog snapshot of ``snapshot_date`` (YYYY-MM-DD)."""
        return f"{self.snapshots_uri}/dt={snapshot_date}"
