"""MOON3.0's configuration: which backbone, which components are on, and their sizes.

Every component the paper's abstract requires is a switch, so ablations compare like with like.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from model.backbone import PRESETS

CONFIG_FORMAT = 1

# The instruction MOON3.0 is prompted with (the system turn). A pretrained backbone is fine-tuned
# under it; a model trained from scratch learns nothing from a fixed prefix, so its training config
# may set "" (no system turn) and save those tokens on every product.
SYSTEM_PROMPT = (
    "You represent e-commerce products for search. First list the product's key attributes "
    "(category, color, material, style, ...) as 'key: value; ...', then give its embedding."
)


@dataclass(frozen=True)
class PromptBudget:
    """Bounds on what one product costs: text tokens and image pixels (hence image tokens)."""

    max_text_tokens: int = 256  # title, category and attributes first; the description gets the rest
    max_image_pixels: int = 224 * 224  # per image; 224x224 -> 64 LLM tokens after the 2x2 merge
    min_image_pixels: int = 56 * 56
    max_extra_images: int = 2
    max_reasoning_tokens: int = 48
    # Saved with the model: it is prompted at inference exactly as it was trained.
    system_prompt: str = SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.max_text_tokens < 16:
            raise ValueError(f"max_text_tokens={self.max_text_tokens} leaves no room for a title: use >= 16")
        if not 0 < self.min_image_pixels <= self.max_image_pixels:
            raise ValueError("need 0 < min_image_pixels <= max_image_pixels")
        if self.max_reasoning_tokens < 1 or self.max_extra_images < 0:
            raise ValueError("max_reasoning_tokens must be >= 1 and max_extra_images >= 0")


@dataclass(frozen=True)
class Moon3Config:
    """The model. ``backbone`` is a preset name (see model.backbone.PRESETS) or a local directory."""

    backbone: str = "tiny"
    embedding_dim: int = 128
    matryoshka_dims: tuple[int, ...] = (32, 64, 128)
    # Multi-head modality fusion over the raw inputs (vision patch features, text input embeddings).
    use_mhmf: bool = True
    mhmf_heads: int = 4
    # Fine-grained residual enhancement: vision-encoder layers tapped, LLM layers injected into.
    use_fire: bool = True
    # Depths as fractions of the stack (0 = first layer, 1 = last), so one config fits any size;
    # e.g. 0.25/0.5/0.75 of Qwen2-VL-2B's 32 vision blocks are blocks 7, 15 and 23.
    fire_vision_depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    fire_llm_depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    # Reasoning: generate "<think>attributes</think>" before the embedding token.
    reasoning: bool = False
    prompt: PromptBudget = field(default_factory=PromptBudget)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.embedding_dim < 8:
            raise ValueError(f"embedding_dim={self.embedding_dim}: use at least 8")
        bad = [d for d in self.matryoshka_dims if not 0 < d <= self.embedding_dim]
        if bad:
            raise ValueError(f"matryoshka_dims {bad} must lie in (0, embedding_dim={self.embedding_dim}]")
        if self.use_mhmf and self.mhmf_heads < 1:
            raise ValueError("mhmf_heads must be >= 1 when use_mhmf is on")
        if self.use_fire:
            depths = self.fire_vision_depths + self.fire_llm_depths
            if not self.fire_vision_depths or not self.fire_llm_depths or not all(0 <= d <= 1 for d in depths):
                raise ValueError("use_fire needs vision and LLM depths, each a fraction in [0, 1]")
        if self.backbone not in PRESETS and not Path(self.backbone).is_dir():
            raise ValueError(
                f"backbone {self.backbone!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                f"nor an existing local model directory"
            )

    def replace(self, **changes: Any) -> "Moon3Config":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Moon3Config(**values)

    def to_json(self) -> str:
        return json.dumps({"format": CONFIG_FORMAT, **asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Moon3Config":
        data = json.loads(text)
        version = data.pop("format", None)
        if version != CONFIG_FORMAT:
            raise ValueError(f"MOON3.0 config format {version!r} is not {CONFIG_FORMAT}: re-export the checkpoint")
        data["prompt"] = PromptBudget(**data.get("prompt", {}))
        for key in ("matryoshka_dims", "fire_vision_depths", "fire_llm_depths"):
            data[key] = tuple(data[key])
        return cls(**data)
