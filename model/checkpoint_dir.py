"""Versioned checkpoint directories, shared by MOON3.0 and Creative4U: safetensors and JSON only.

    checkpoint.json    format, model name, version, parent version, creation time, SHA-256 per file
    ...                the model's own files (backbone/, configs, extra safetensors)

The version is ``<model>-<hash of the weights' hashes>``, so the same weights always carry the same
version. Saving writes into a temporary folder and renames it: a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moonpipe.storage import sha256_file

CHECKPOINT_FORMAT = 1
MANIFEST = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def write_checkpoint(
    directory: str | Path, model_name: str, write_files: Callable[[Path], None], parent_version: str | None = None
) -> str:
    """Create ``directory`` (which must not exist) with the files ``write_files(folder)`` writes plus
    the manifest; returns the version."""
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"checkpoint directory {target} already exists: choose a new one per version")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_files(staging)
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        weights = sorted(h for name, h in files.items() if name.endswith(".safetensors"))
        version = f"{model_name}-" + hashlib.sha256("".join(weights).encode()).hexdigest()[:12]
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "model": model_name,
            "model_version": version,
            "parent_version": parent_version,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version


def read_manifest(directory: str | Path, model_name: str, *, label: str, how_to_create: str = "") -> dict[str, Any]:
    """The manifest of a ``model_name`` checkpoint; ``label`` names the model in errors."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a {label} checkpoint: {MANIFEST} is missing{how_to_create}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("model") != model_name:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} of model {manifest.get('model')!r} is not a "
            f"format-{CHECKPOINT_FORMAT} {model_name} checkpoint"
        )
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest``, after checking that every file it lists exists with its recorded hash."""
    root = Path(directory)
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {root} is incomplete: {name} is missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"checkpoint {root} is corrupt: {name} does not match its recorded SHA-256")
    return manifest
