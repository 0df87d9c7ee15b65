"""Build Creative4U models and save/load them as versioned checkpoint directories.

The same style as MOON3.0's checkpoints (model.moon3_checkpoint), safetensors and JSON only::

    checkpoint.json          format, model "creative4u", version, parent, creation time, SHA-256 per file
    creative4u_config.json   Creative4UConfig
    backbone/                the fine-tuned backbone as a Hugging Face directory (config,
                             model.safetensors, tokenizer with the format tags and chat template,
                             preprocessor config)

The version is derived from the weights' hashes; saving goes through a temporary folder and a
rename, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from model.backbone import PRESETS, build_preset, load_local
from model.creative4u import Creative4UModel
from model.creative4u_config import Creative4UConfig
from moonpipe.storage import sha256_file

CHECKPOINT_FORMAT = 1
MODEL_NAME = "creative4u"
_MANIFEST = "checkpoint.json"
_CONFIG = "creative4u_config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def build_model(config: Creative4UConfig, dtype: torch.dtype | None = None, device: str | None = None) -> Creative4UModel:
    """A new model from the config's preset (random weights) or local backbone directory."""
    if config.backbone in PRESETS:
        with torch.device(device or "cpu"):
            backbone, tokenizer, image_processor = build_preset(config.backbone, seed=config.seed)
    else:
        backbone, tokenizer, image_processor = load_local(config.backbone, dtype=dtype)
    model = Creative4UModel(config, backbone, tokenizer, image_processor)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_checkpoint(model: Creative4UModel, directory: str | Path, parent_version: str | None = None) -> str:
    """Write ``model`` to ``directory`` (which must not exist yet); returns the model version."""
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"checkpoint directory {target} already exists: choose a new one per version")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        backbone_dir = staging / "backbone"
        model.backbone.save_pretrained(backbone_dir, safe_serialization=True)
        model.tokenizer.save_pretrained(backbone_dir)
        model.image_processor.save_pretrained(backbone_dir)
        (staging / _CONFIG).write_text(model.config.to_json())
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        weights = sorted(h for name, h in files.items() if name.endswith(".safetensors"))
        version = f"{MODEL_NAME}-" + hashlib.sha256("".join(weights).encode()).hexdigest()[:12]
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "model": MODEL_NAME,
            "model_version": version,
            "parent_version": parent_version,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "files": files,
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    model.version = version
    return version


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / _MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a Creative4U checkpoint: {_MANIFEST} is missing. Create one with "
            f"`moonpipe creatives init-model --out {directory}` or point --model at a trained checkpoint"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("model") != MODEL_NAME:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} of model {manifest.get('model')!r} is not a "
            f"format-{CHECKPOINT_FORMAT} {MODEL_NAME} checkpoint"
        )
    return manifest


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The manifest, after checking that every listed file exists with its recorded hash."""
    root = Path(directory)
    manifest = read_manifest(root)
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {root} is incomplete: {name} is missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"checkpoint {root} is corrupt: {name} does not match its recorded SHA-256")
    return manifest


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None, verify: bool = True) -> Creative4UModel:
    """The model saved in ``directory``; it gives the outputs it gave when saved."""
    root = Path(directory)
    manifest = verify_checkpoint(root) if verify else read_manifest(root)
    config = Creative4UConfig.from_json((root / _CONFIG).read_text(), backbone=str(root / "backbone"))
    backbone, tokenizer, image_processor = load_local(root / "backbone", dtype=dtype)
    model = Creative4UModel(config, backbone, tokenizer, image_processor)
    model.version = manifest["model_version"]
    return model.eval()
