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

from pathlib import Path
from typing import Any

import torch

from model import checkpoint_dir
from model.backbone import PRESETS, add_pipeline_tokens, build_preset, load_local
from model.checkpoint_dir import CheckpointError, verify_files, write_checkpoint
from model.moon3 import Moon3Model
from model.moon3_config import Moon3Config


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

    def write_files(folder: Path) -> None:
        backbone_dir = folder / "backbone"
        model.backbone.save_pretrained(backbone_dir, safe_serialization=True)
        model.tokenizer.save_pretrained(backbone_dir)
        model.image_processor.save_pretrained(backbone_dir)
        save_file(_head_state(model), str(folder / "heads.safetensors"))
        (folder / "moon3_config.json").write_text(model.config.to_json())

    return write_checkpoint(directory, "moon3", write_files, parent_version)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    return checkpoint_dir.read_manifest(directory, "moon3", label="MOON3.0")


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The manifest, after checking that every listed file exists with its recorded hash."""
    return verify_files(directory, read_manifest(directory))


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
