"""Creative4U's configuration: the backbone, the input budget and how outputs are decoded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from model.backbone import PRESETS

CONFIG_FORMAT = 1
DECODING_MODES = ("free", "guided")


@dataclass(frozen=True)
class Creative4UConfig:
    """The model. ``backbone`` is a preset name (model.backbone.PRESETS) or a local directory."""

    backbone: str = "tiny"
    seed: int = 0
    # Per creative image; 112x112 -> 16 LLM tokens after Qwen-VL's 2x2 merge. A real backbone
    # reads finer detail (garbled vs legible text) at 448x448 (256 tokens).
    max_image_pixels: int = 112 * 112
    min_image_pixels: int = 56 * 56
    max_queries: int = 8  # of the segment's interest queries, most frequent first
    # "free": the model writes the whole output and it is parsed strictly (a trained model).
    # "guided": the output grammar is enforced while decoding (think, then </think><answer>,
    # then A or B, then </answer>): the answer is still the model's own more probable letter.
    # For a model that has not learnt the format yet (the untrained bootstrap).
    decoding: str = "free"
    max_new_tokens: int = 384  # free decoding: reasoning and answer together
    guided_think_tokens: int = 32  # guided decoding: reasoning budget before the answer is due
    max_retries: int = 2  # malformed free outputs are sampled again this many times, then undecided
    retry_temperature: float = 0.8

    def __post_init__(self) -> None:
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding={self.decoding!r}: use one of {DECODING_MODES}")
        if not 0 < self.min_image_pixels <= self.max_image_pixels:
            raise ValueError("need 0 < min_image_pixels <= max_image_pixels")
        if self.max_new_tokens < 8 or self.guided_think_tokens < 1:
            raise ValueError("max_new_tokens must be >= 8 and guided_think_tokens >= 1")
        if self.max_retries < 0 or self.retry_temperature <= 0:
            raise ValueError("max_retries must be >= 0 and retry_temperature > 0")
        if self.backbone not in PRESETS and not Path(self.backbone).is_dir():
            raise ValueError(
                f"backbone {self.backbone!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                f"nor an existing local model directory"
            )

    def replace(self, **changes: Any) -> "Creative4UConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Creative4UConfig(**values)

    def to_json(self) -> str:
        return json.dumps({"format": CONFIG_FORMAT, **asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, backbone: str | None = None) -> "Creative4UConfig":
        """The saved config; ``backbone`` replaces the saved one (a checkpoint loads its own copy,
        so the directory it was trained from need not exist any more)."""
        data = json.loads(text)
        if backbone is not None:
            data["backbone"] = backbone
        version = data.pop("format", None)
        if version != CONFIG_FORMAT:
            raise ValueError(f"Creative4U config format {version!r} is not {CONFIG_FORMAT}: re-export the checkpoint")
        return cls(**data)
