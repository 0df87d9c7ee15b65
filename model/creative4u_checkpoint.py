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

from pathlib import Path
from typing import Any

import torch

from model import checkpoint_dir
from model.backbone import PRESETS, build_preset, load_local
from model.checkpoint_dir import CheckpointError, verify_files, write_checkpoint  # noqa: F401  (re-exported)
from model.creative4u import Creative4UModel
from model.creative4u_config import Creative4UConfig

MODEL_NAME = "creative4u"
_CONFIG = "creative4u_config.json"


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

    def write_files(folder: Path) -> None:
        backbone_dir = folder / "backbone"
        model.backbone.save_pretrained(backbone_dir, safe_serialization=True)
        model.tokenizer.save_pretrained(backbone_dir)
        model.image_processor.save_pretrained(backbone_dir)
        (folder / _CONFIG).write_text(model.config.to_json())

    version = write_checkpoint(directory, MODEL_NAME, write_files, parent_version)
    model.version = version
    return version


def read_manifest(directory: str | Path) -> dict[str, Any]:
    return checkpoint_dir.read_manifest(
        directory, MODEL_NAME, label="Creative4U",
        how_to_create=f". Create one with `moonpipe creatives init-model --out {directory}` or point --model at a "
        "trained checkpoint",
    )


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The manifest, after checking that every listed file exists with its recorded hash."""
    return verify_files(directory, read_manifest(directory))


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None, verify: bool = True) -> Creative4UModel:
    """The model saved in ``directory``; it gives the outputs it gave when saved."""
    root = Path(directory)
    manifest = verify_checkpoint(root) if verify else read_manifest(root)
    config = Creative4UConfig.from_json((root / _CONFIG).read_text(), backbone=str(root / "backbone"))
    backbone, tokenizer, image_processor = load_local(root / "backbone", dtype=dtype)
    model = Creative4UModel(config, backbone, tokenizer, image_processor)
    model.version = manifest["model_version"]
    return model.eval()
