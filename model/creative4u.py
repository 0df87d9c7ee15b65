"""Creative4U: a vision-language model that compares two creatives of a product for a user segment.

The paper (arXiv 2508.12628) has no public code; this is the project's realisation. The model is
a Qwen2-VL / Qwen2.5-VL backbone (a local directory or a preset from model.backbone) that reads
the product title, the segment's frequent searches and creatives A and B, walks the evaluation
protocol of model.creative4u_protocol and writes ``<think>…</think><answer>A|B</answer>``.

* ``encode`` / ``collate``: a comparison -> prompt tokens (chat template, image tokens expanded)
  and pixels; ``encode_for_training`` adds a target with the prompt masked out of the labels.
* ``judge``: batched generation, strict parsing, bounded retries of malformed outputs (sampled),
  then undecided. The confidence is the model's own probability of its letter, read from the
  logits at the answer position and normalised over {A, B}.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.creative4u_config import Creative4UConfig
from model.creative4u_protocol import (
    ANSWER_END,
    ANSWER_START,
    ANSWERS,
    CHAT_TEMPLATE,
    FORMAT_TOKENS,
    THINK_END,
    THINK_START,
    PairPrompt,
    build_prompt,
    parse_output,
)
from model.image_pixels import qwen_vl_pixels

LOG = logging.getLogger("moonpipe.model.creative4u")
_MAX_IMAGE_SIDE = 8192  # a creative larger than this is not an ad image; refuse before resizing


class CreativeRejected(ValueError):
    """A creative the model cannot read; ``code`` is machine-readable (quarantine reason_code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_creative(data: bytes | None, what: str = "creative image") -> Any:
    """The image as RGB, fully decoded; CreativeRejected when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise CreativeRejected("image_missing", f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        if max(image.size) > _MAX_IMAGE_SIDE:
            raise CreativeRejected("image_too_large", f"{what} is {image.size[0]}x{image.size[1]} pixels")
        image.load()  # a truncated file fails here, not inside a batch
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, CreativeRejected):
            raise
        raise CreativeRejected("image_undecodable", f"{what} cannot be decoded ({len(data)} bytes): {error}") from None
    return image.convert("RGB")


@dataclass(frozen=True)
class Comparison:
    """One comparison: the prompt facts and the two creatives' encoded images (A shown first)."""

    prompt: PairPrompt
    image_a: bytes
    image_b: bytes


@dataclass
class EncodedComparison:
    input_ids: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class Judgment:
    """The model's verdict on one comparison. ``answer`` None = undecided (``error_code`` says why)."""

    answer: str | None
    confidence: float | None  # probability of ``answer`` among {A, B}
    prob_a: float | None  # probability of A among {A, B} at the answer position
    reasoning: str | None
    raw_output: str
    attempts: int
    error_code: str | None = None
    error: str | None = None


def add_format_tokens(backbone: nn.Module, tokenizer: Any) -> None:
    """Make the four format tags single special tokens and give the tokenizer a chat template."""
    missing = [t for t in FORMAT_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(len(tokenizer))
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    for letter in ANSWERS:
        if len(tokenizer(letter, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"the tokenizer splits the answer letter {letter!r}: Creative4U needs it as one token")


class _ProtocolGrammar:
    """A logits processor that enforces ``<think>…</think><answer>A|B</answer><eos>`` while decoding
    (guided decoding). The reasoning is free text within a token budget; the letter is the model's
    more probable one, since only A and B stay allowed at that step."""

    def __init__(self, ids: dict[str, int], banned_in_think: list[int], think_budget: int, prompt_length: int) -> None:
        self.ids = ids
        self.banned = torch.tensor(banned_in_think)
        self.budget = think_budget
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = self.ids
        for row, generated in enumerate(input_ids[:, self.prompt_length :].tolist()):
            allowed: list[int] | None
            if not generated:
                allowed = [ids[THINK_START]]
            elif ids[ANSWER_END] in generated or ids["eos"] in generated:
                allowed = [ids["eos"]]
            elif generated[-1] == ids[ANSWER_START]:
                allowed = [ids["A"], ids["B"]]
            elif generated[-1] in (ids["A"], ids["B"]) and ids[ANSWER_START] in generated:
                allowed = [ids[ANSWER_END]]
            elif generated[-1] == ids[THINK_END]:
                allowed = [ids[ANSWER_START]]
            elif len(generated) - 1 >= self.budget:
                allowed = [ids[THINK_END]]
            else:
                scores[row, self.banned.to(scores.device)] = float("-inf")
                continue
            keep = scores[row, allowed].clone()
            scores[row] = float("-inf")
            scores[row, allowed] = keep
        return scores


class Creative4UModel(nn.Module):
    """The backbone with Creative4U's prompt, decoding and parsing. ``backbone`` is a Hugging Face
    Qwen2-VL model: the trainer fine-tunes it directly (``forward`` returns its output)."""

    def __init__(self, config: Creative4UConfig, backbone: nn.Module, tokenizer: Any, image_processor: Any) -> None:
        super().__init__()
        from model.patch_projection import use_linear_patch_projection
        from model.vision_attention import use_grouped_vision_attention

        use_grouped_vision_attention(backbone)
        use_linear_patch_projection(backbone)
        add_format_tokens(backbone, tokenizer)
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.version = f"untrained-{config.backbone}-seed{config.seed}"
        self.image_token_id = backbone.config.image_token_id
        convert = tokenizer.convert_tokens_to_ids
        self.token_ids = {tag: convert(tag) for tag in FORMAT_TOKENS}
        self.token_ids.update({letter: tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in ANSWERS})
        self.token_ids["eos"] = tokenizer.eos_token_id
        self.token_ids["pad"] = tokenizer.pad_token_id
        # In the reasoning: no format tags, no end of turn, no image or vision markers.
        self._banned_in_think = sorted(
            {self.token_ids[t] for t in (THINK_START, ANSWER_START, ANSWER_END)}
            | {tokenizer.eos_token_id, tokenizer.pad_token_id}
            | {convert(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>")}
        )

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    def forward(self, **inputs: Any) -> Any:
        return self.backbone(**inputs)

    # -- inputs ----------------------------------------------------------------------------------

    def _pixels(self, comparison: Comparison) -> tuple[torch.Tensor, torch.Tensor]:
        images = [decode_creative(comparison.image_a, "image A"), decode_creative(comparison.image_b, "image B")]
        return qwen_vl_pixels(self.image_processor, images, self.config.min_image_pixels, self.config.max_image_pixels)

    def prompt_text(self, comparison: Comparison | PairPrompt, grid: torch.Tensor | None = None) -> str:
        """The chat-templated prompt; with ``grid`` each image placeholder is expanded to its tokens."""
        prompt = comparison.prompt if isinstance(comparison, Comparison) else comparison
        text = build_prompt(self.tokenizer, prompt, self.config.max_queries)
        if grid is None:
            return text
        merge = self.image_processor.merge_size**2
        parts = text.split("<|image_pad|>")
        counts = [int(thw.prod() // merge) for thw in grid]
        return parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))

    def encode(self, comparison: Comparison) -> EncodedComparison:
        """Prompt tokens and pixels; raises CreativeRejected for an unreadable image."""
        pixel_values, grid = self._pixels(comparison)
        ids = self.tokenizer(self.prompt_text(comparison, grid), add_special_tokens=False)["input_ids"]
        return EncodedComparison(ids, pixel_values, grid)

    def encode_for_training(self, comparison: Comparison, target: str) -> dict[str, torch.Tensor]:
        """One CoT-SFT example: prompt + target + end of turn, with labels only on the target."""
        encoded = self.encode(comparison)
        target_ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        input_ids = torch.tensor([encoded.input_ids + target_ids])
        labels = torch.tensor([[-100] * encoded.length + target_ids])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "pixel_values": encoded.pixel_values,
            "image_grid_thw": encoded.image_grid_thw,
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
        }

    def collate(self, items: Sequence[EncodedComparison]) -> dict[str, torch.Tensor]:
        """Left-padded batch (generation continues every row at the same column)."""
        pad = self.tokenizer.pad_token_id
        length = max(item.length for item in items)
        input_ids = torch.full((len(items), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, length - item.length :] = torch.tensor(item.input_ids)
            attention_mask[row, length - item.length :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat([item.pixel_values for item in items]),
            "image_grid_thw": torch.cat([item.image_grid_thw for item in items]),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
        }

    # -- judging ---------------------------------------------------------------------------------

    def _generate(self, batch: dict[str, torch.Tensor], guided: bool, sample: bool,
                  synced: bool = False) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Generated token ids per row and the raw (unprocessed) logits per step [rows, vocab].
        ``synced``: every rank steps until all have finished (training under ZeRO-3)."""
        from transformers import LogitsProcessorList

        prompt_length = batch["input_ids"].shape[1]
        processors = LogitsProcessorList()
        budget = self.config.max_new_tokens
        if guided:
            processors.append(
                _ProtocolGrammar(self.token_ids, self._banned_in_think, self.config.guided_think_tokens, prompt_length)
            )
            budget = self.config.guided_think_tokens + 6  # <think>, </think>, <answer>, letter, </answer>, eos
        out = self.backbone.generate(
            **{k: v.to(self.device) for k, v in batch.items()},
            max_new_tokens=budget,
            do_sample=sample,
            temperature=self.config.retry_temperature if sample else None,
            top_p=None,
            top_k=None,
            logits_processor=processors,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            synced_gpus=synced,
        )
        generated = out.sequences[:, prompt_length:].tolist()
        rows = []
        for tokens in generated:
            if self.tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.tokenizer.eos_token_id)]
            rows.append(tokens)
        return rows, [step.float().cpu() for step in out.logits]

    def _verdict(self, tokens: list[int], logits: list[torch.Tensor], row: int, attempts: int) -> Judgment:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        parsed = parse_output(text)
        if not parsed.ok:
            return Judgment(None, None, None, parsed.reasoning, text, attempts, parsed.error_code, parsed.error)
        ids = self.token_ids
        step = tokens.index(ids[ANSWER_START]) + 1
        while step < len(tokens) and tokens[step] not in (ids["A"], ids["B"]):
            step += 1  # whitespace before the letter
        pair = logits[step][row, [ids["A"], ids["B"]]]
        prob_a = float(torch.softmax(pair, dim=0)[0])
        confidence = prob_a if parsed.answer == "A" else 1.0 - prob_a
        return Judgment(parsed.answer, confidence, prob_a, parsed.reasoning, text, attempts)

    @torch.inference_mode()
    def judge(self, comparisons: Sequence[Comparison], decoding: str | None = None, max_batch: int = 16) -> list[Judgment]:
        """Judge every comparison; results in input order. Unreadable images give an undecided
        judgment with the rejection code (0 attempts); malformed outputs are retried, then undecided."""
        decoding = decoding or self.config.decoding
        if decoding not in ("free", "guided"):
            raise ValueError(f"decoding={decoding!r}: use 'free' or 'guided'")
        guided = decoding == "guided"
        results: list[Judgment | None] = [None] * len(comparisons)
        encoded: dict[int, EncodedComparison] = {}
        for index, comparison in enumerate(comparisons):
            try:
                encoded[index] = self.encode(comparison)
            except CreativeRejected as rejected:
                results[index] = Judgment(None, None, None, None, "", 0, rejected.code, str(rejected))
        pending = sorted(encoded, key=lambda i: encoded[i].length)
        attempts_allowed = 1 if guided else 1 + self.config.max_retries
        for attempt in range(1, attempts_allowed + 1):
            failed = []
            for start in range(0, len(pending), max_batch):
                indexes = pending[start : start + max_batch]
                batch = self.collate([encoded[i] for i in indexes])
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.config.seed * 1000 + attempt)  # reruns sample the same retries
                    rows, logits = self._generate(batch, guided, sample=attempt > 1)
                for row, (index, tokens) in enumerate(zip(indexes, rows)):
                    results[index] = self._verdict(tokens, logits, row, attempt)
                    if results[index].answer is None:
                        failed.append(index)
            pending = failed
            if not pending:
                break
        return results  # type: ignore[return-value]
