"""From a product to model inputs: one prompt builder with budgets on text and image size.

A product that cannot be turned into inputs (undecodable image, no text at all) raises
``ProductRejected`` with a reason code; the batch predictor records it as that row's error.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.backbone import THINK_START
from model.image_pixels import qwen_vl_pixels
from model.moon3_config import PromptBudget


TOKEN_CACHE_ENTRIES = 65_536  # memoised prompt texts per processor (cleared when full)


class ProductRejected(ValueError):
    """A product the model cannot process; ``code`` is machine-readable (quarantine reason_code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ProductInput:
    """What MOON3.0 reads of a product."""

    title: str | None
    image_bytes: bytes | None
    category_path: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    extra_images: Sequence[bytes] = ()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "ProductInput":
        """From a products-table row (attributes as a dict or Arrow's list of pairs)."""
        attributes = row.get("attributes") or {}
        if not isinstance(attributes, Mapping):
            attributes = dict(attributes)
        return cls(
            title=row.get("title"),
            image_bytes=row.get("image_bytes"),
            category_path=row.get("category_path"),
            attributes=attributes,
            description=row.get("description"),
            extra_images=tuple(row.get("extra_images") or ()),
        )


@dataclass
class Encoded:
    """One product's prompt tokens (image placeholders expanded) and its images' pixels."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _decode_image(data: bytes | None, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ProductRejected("image_missing", f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode fully: a truncated file fails here, not inside the batch
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ProductRejected("image_undecodable", f"{what} cannot be decoded ({len(data)} bytes): {error}") from None
    return image.convert("RGB")


class Moon3Processor:
    """Builds prompts and tensors for Moon3Model; shared by inference, training and evaluation."""

    def __init__(self, tokenizer: Any, image_processor: Any, budget: PromptBudget) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.budget = budget
        self._token_cache: dict[str, tuple[int, ...]] = {}

    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids (no special tokens added), memoised: prompts repeat (the chat frame,
        image-only training views, recurring titles), and the tokenizer call dominates their cost."""
        ids = self._token_cache.get(text)
        if ids is None:
            if len(self._token_cache) >= TOKEN_CACHE_ENTRIES:
                self._token_cache.clear()
            ids = self._token_cache[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(ids)

    def product_text(self, product: ProductInput) -> str:
        """Title, category and attributes first; the description fills what the budget leaves."""
        title = (product.title or "").strip()
        description = (product.description or "").strip()
        if not title and not description:
            raise ProductRejected("empty_text", "product has neither a title nor a description")
        lines = [f"Title: {title}"] if title else []
        if product.category_path:
            lines.append(f"Category: {product.category_path.strip()}")
        if product.attributes:
            lines.append("Attributes: " + "; ".join(f"{k}: {v}" for k, v in sorted(product.attributes.items())))
        head = "\n".join(lines)
        head_ids = self.token_ids(head)[: self.budget.max_text_tokens]
        room = self.budget.max_text_tokens - len(head_ids) - 4
        if description and room > 0:
            desc_ids = self.token_ids("\nDescription: " + description)[:room]
            return self.tokenizer.decode(head_ids + desc_ids)
        return self.tokenizer.decode(head_ids)

    def encode(self, product: ProductInput) -> Encoded:
        """Tokens and pixels of one product; raises ProductRejected for what cannot be processed."""
        images = [_decode_image(product.image_bytes, "main image")]
        for index, data in enumerate(product.extra_images[: self.budget.max_extra_images]):
            images.append(_decode_image(data, f"extra image {index + 1}"))
        pixel_values, grid = qwen_vl_pixels(
            self.image_processor, images, self.budget.min_image_pixels, self.budget.max_image_pixels)
        return Encoded(self.token_ids(self.product_prompt(product, grid)), pixel_values, grid)

    def product_prompt(self, product: ProductInput, image_grid_thw: torch.Tensor) -> str:
        """The product's chat prompt, each image's placeholder expanded to its merged patches."""
        merge = self.image_processor.merge_size**2
        vision = "".join(
            "<|vision_start|>" + "<|image_pad|>" * (t * h * w // merge) + "<|vision_end|>"
            for t, h, w in image_grid_thw.tolist()
        )
        return self.chat_prompt(vision + self.product_text(product))

    def encode_query(self, query: str) -> Encoded:
        """A search query as a text-only prompt in the product prompt's format."""
        text = self.tokenizer.decode(self.token_ids(f"Query: {query.strip()}")[: self.budget.max_text_tokens])
        return Encoded(self.token_ids(self.chat_prompt(text)), None, None)

    def chat_prompt(self, user: str) -> str:
        """The chat turns up to the opened reasoning; no system turn when the budget's prompt is empty."""
        system = self.budget.system_prompt
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{THINK_START}"

    def collate(self, items: Sequence[Encoded], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Left-pad a batch (the embedding token then sits last in every row) and stack pixels."""
        pad = self.tokenizer.pad_token_id
        length = max(item.length for item in items)
        input_ids = torch.full((len(items), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, length - item.length :] = torch.tensor(item.input_ids)
            attention_mask[row, length - item.length :] = 1
        image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        tensors = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            # Found here on the CPU, so the GPU never waits for a nonzero() in the forward pass.
            "image_positions": (input_ids == image_token).nonzero(),
        }
        with_images = [item for item in items if item.pixel_values is not None]
        if with_images:
            tensors["pixel_values"] = torch.cat([i.pixel_values for i in with_images])
            tensors["image_grid_thw"] = torch.cat([i.image_grid_thw for i in with_images])
        return {k: v.to(device) for k, v in tensors.items()}
