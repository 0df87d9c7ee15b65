"""Build MOON3.0 models, and save/load them as versioned checkpoint directories.

A checkpoint is a directory of safetensors and JSON, never pickles::

    checkpoint.json      format, model version, creation time, SHA-256 of every file
    moon3_config.json    Moon3Config
    backbone/            the vision-language backbone as a Hugging Face directory
                         (config, model.safetensors, tokenizer, preprocessor config)
    heads.safetensors    MHMF, FIRE and the projection head

The version is derived from the weights' hashes, so the same weights always carry the same
version. Saving writes to a temporary folder and renames it: a crash never leaves half a checkpoint.
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

from model.backbone import PRESETS, add_pipeline_tokens, build_preset, load_local
from model.moon3 import Moon3Model
from model.moon3_config import Moon3Config
from moonpipe.storage import sha256_file

CHECKPOINT_FORMAT = 1
_MANIFEST = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def build_model(config: Moon3Config, dtype: torch.dtype | None = None, device: str | None = None) -> Moon3Model:
    """A new model: the backbone from its preset or local directory, fresh MHMF/FIRE/head weights.
    ``device`` initialises a preset's random weights there directly (fast for GPU-sized presets)."""
    if config.backbone in PRESETS:
        with torch.device(device or "cpu"):
            backbone, tokenizer, image_processor = build_preset(config.backbone, seed=config.seed)
    else:
        backbone, tokenizer, image_processor = load_local(config.backbone, dtype=dtype)
    add_pipeline_tokens(backbone, tokenizer)
    model = Moon3Model(config, backbone, tokenizer, image_processor)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _head_state(model: Moon3Model) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("backbone.")
    }


def save_checkpoint(model: Moon3Model, directory: str | Path, parent_version: str | None = None) -> str:
    """Write ``model`` to ``directory`` (which must not exist yet); returns the model version."""
    from safetensors.torch import save_file

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
        save_file(_head_state(model), str(staging / "heads.safetensors"))
        (staging / "moon3_config.json").write_text(model.config.to_json())
        files = {
            str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        weights = sorted(h for name, h in files.items() if name.endswith(".safetensors"))
        version = "moon3-" + hashlib.sha256("".join(weights).encode()).hexdigest()[:12]
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "model": "moon3",
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
    return version


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / _MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a MOON3.0 checkpoint: {_MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("model") != "moon3":
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} of model {manifest.get('model')!r} is not a "
            f"format-{CHECKPOINT_FORMAT} moon3 checkpoint"
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


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None, verify: bool = True) -> Moon3Model:
    """The model saved in ``directory``; it reproduces the embeddings it gave when saved."""
    from safetensors.torch import load_file

    root = Path(directory)
    manifest = verify_checkpoint(root) if verify else read_manifest(root)
    config = Moon3Config.from_json((root / "moon3_config.json").read_text()).replace(backbone=str(root / "backbone"))
    backbone, tokenizer, image_processor = load_local(root / "backbone", dtype=dtype)
    model = Moon3Model(config, backbone, tokenizer, image_processor)
    state = load_file(str(root / "heads.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.version = manifest["model_version"]
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
