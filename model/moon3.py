"""MOON3.0: a reasoning-aware vision-language model turned into a product embedding model.

The paper (arXiv 2604.00513) has no public code; this is the project's realisation of what its
abstract requires, each part switchable in ``Moon3Config``:

* reasoning then embedding: optionally generate ``<think>attributes</think>`` and take the
  embedding at the ``<|emb|>`` token that follows (one forward pass when reasoning is off);
* MHMF, multi-head modality fusion: learnable queries attend over the RAW inputs (the vision
  features and text embeddings the LLM receives), with a per-head adaptive modality gate, so that
  a long reasoning cannot dilute what the product actually shows and says;
* FIRE, fine-grained residual enhancement: features of intermediate vision-encoder layers,
  re-injected as zero-initialised gated residuals at the image tokens of several LLM layers, so
  that local details survive the depth of the network;
* a projection head to an L2-normalised vector, truncatable Matryoshka-style.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import EMBED_TOKEN, THINK_END
from model.moon3_config import Moon3Config


class ModalityFusion(nn.Module):
    """MHMF: per head, a learnable query attends over vision tokens and over text tokens of the
    raw input; an adaptive gate per head mixes the two summaries (0.5 at initialisation)."""

    def __init__(self, hidden_size: int, heads: int) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by mhmf_heads={heads}")
        self.heads, self.head_dim = heads, hidden_size // heads
        self.queries = nn.Parameter(torch.randn(heads, self.head_dim) / math.sqrt(self.head_dim))
        self.norm = nn.LayerNorm(hidden_size)
        self.keys = nn.ModuleDict({m: nn.Linear(hidden_size, hidden_size, bias=False) for m in ("vision", "text")})
        self.values = nn.ModuleDict({m: nn.Linear(hidden_size, hidden_size, bias=False) for m in ("vision", "text")})
        # Zero weights and bias: every head starts at an even vision/text mix.
        self.gate_weight = nn.Parameter(torch.zeros(heads, 2 * self.head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(heads))
        self.out = nn.Linear(hidden_size, hidden_size)

    def _attend(self, states: torch.Tensor, mask: torch.Tensor, modality: str) -> torch.Tensor:
        batch, length, _ = states.shape
        keys = self.keys[modality](states).view(batch, length, self.heads, self.head_dim)
        values = self.values[modality](states).view(batch, length, self.heads, self.head_dim)
        scores = torch.einsum("bshd,hd->bhs", keys, self.queries.to(keys.dtype)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(values.dtype)  # no tokens -> zeros
        return torch.einsum("bhs,bshd->bhd", weights, values)

    def forward(
        self, raw_states: torch.Tensor, vision_mask: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused vector [B, H] and each head's vision share [B, heads]."""
        states = self.norm(raw_states)
        vision = self._attend(states, vision_mask, "vision")
        text = self._attend(states, text_mask, "text")
        logits = (torch.cat([vision, text], dim=-1) * self.gate_weight.to(vision.dtype)).sum(-1) + self.gate_bias
        gate = torch.sigmoid(logits.float())
        # A product without an image (or without text) relies wholly on the other modality.
        gate = torch.where(vision_mask.any(1, keepdim=True), gate, torch.zeros_like(gate))
        gate = torch.where(text_mask.any(1, keepdim=True), gate, torch.ones_like(gate)).to(vision.dtype)
        fused = gate[..., None] * vision + (1 - gate[..., None]) * text
        return self.out(fused.flatten(1)), gate


class ResidualEnhancement(nn.Module):
    """FIRE: local features from several vision-encoder depths (each image token's 2x2 patch
    window), mixed per LLM layer and added to that layer's image-token states through a tanh gate
    that starts at zero, so the backbone is unchanged at initialisation."""

    def __init__(self, vision_dim: int, merge_size: int, hidden_size: int, vision_layers: int, llm_layers: int) -> None:
        super().__init__()
        window = vision_dim * merge_size**2
        self.window = window
        self.local = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(window), nn.Linear(window, hidden_size)) for _ in range(vision_layers)]
        )
        self.scale_logits = nn.Parameter(torch.zeros(llm_layers, vision_layers))  # even mix of depths at start
        self.gates = nn.Parameter(torch.zeros(llm_layers))

    def local_features(self, vision_states: list[torch.Tensor]) -> torch.Tensor:
        """[vision_layers, image_tokens, H] from per-layer patch states [patches, vision_dim]."""
        return torch.stack([proj(state.reshape(-1, self.window)) for proj, state in zip(self.local, vision_states)])

    def residual(self, depth: int, features: torch.Tensor) -> torch.Tensor:
        mix = torch.softmax(self.scale_logits[depth], dim=0).to(features.dtype)
        return torch.tanh(self.gates[depth]).to(features.dtype) * torch.einsum("l,lth->th", mix, features)


@dataclass
class Moon3Output:
    embeddings: torch.Tensor  # [B, embedding_dim], L2-normalised
    reasoning: list[str | None]  # generated attribute text per row (None when reasoning is off)
    modality_gates: torch.Tensor | None  # [B, heads] vision share per MHMF head


def vision_width(vision_config: Any) -> int:
    """Width of the vision blocks: ``embed_dim`` in Qwen2-VL, ``hidden_size`` in Qwen2.5-VL."""
    width = getattr(vision_config, "embed_dim", None)
    return width if width is not None else vision_config.hidden_size


def _seeded(seed: int, build: Any, *args: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args)


def layer_indexes(depths: tuple[float, ...], count: int) -> list[int]:
    """Fractions of a stack of ``count`` layers -> distinct layer indexes (0 first, 1 last)."""
    return sorted({min(count - 1, max(0, round(d * (count - 1)))) for d in depths})


class Moon3Model(nn.Module):
    """Backbone + MHMF + FIRE + projection head. Inputs come from ``Moon3Processor``."""

    def __init__(self, config: Moon3Config, backbone: nn.Module, tokenizer: Any, image_processor: Any) -> None:
        super().__init__()
        from model.patch_projection import use_linear_patch_projection
        from model.vision_attention import use_grouped_vision_attention

        # Both give the same results as transformers' own code, at a fraction of the cost.
        use_grouped_vision_attention(backbone)
        use_linear_patch_projection(backbone)
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        text_config = backbone.config.text_config
        vision_config = backbone.config.vision_config
        hidden = text_config.hidden_size
        self.image_token_id = backbone.config.image_token_id
        self.embed_token_id = tokenizer.convert_tokens_to_ids(EMBED_TOKEN)
        self.think_end_id = tokenizer.convert_tokens_to_ids(THINK_END)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids) | {self.image_token_id}))
        # Each added module draws its initial weights from its own seeded stream, so switching one
        # off (an ablation) leaves the others' weights identical.
        self.mhmf = _seeded(config.seed + 1, ModalityFusion, hidden, config.mhmf_heads) if config.use_mhmf else None
        self.fire = None
        if config.use_fire:
            self.fire_vision_layers = layer_indexes(config.fire_vision_depths, vision_config.depth)
            self.fire_llm_layers = layer_indexes(config.fire_llm_depths, text_config.num_hidden_layers)
            self.fire = _seeded(
                config.seed + 2,
                ResidualEnhancement,
                vision_width(vision_config),
                vision_config.spatial_merge_size,
                hidden,
                len(self.fire_vision_layers),
                len(self.fire_llm_layers),
            )
            layers = backbone.model.language_model.layers
            for depth, layer_index in enumerate(self.fire_llm_layers):
                layers[layer_index].register_forward_hook(self._fire_hook(depth))
        self.head = _seeded(
            config.seed + 3, lambda: nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.embedding_dim))
        )
        self._injection: tuple[torch.Tensor, torch.Tensor] | None = None  # (image mask, local features)

    # -- FIRE injection ---------------------------------------------------------------------------

    def _fire_hook(self, depth: int):
        def inject(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if self._injection is None:
                return None
            shape, rows, cols, features = self._injection
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[:2] != shape:  # a decoding step: no image tokens in it
                return None
            residual = self.fire.residual(depth, features).to(hidden.dtype)
            hidden = hidden.index_put((rows, cols), residual, accumulate=True)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return inject

    @contextmanager
    def _injecting(
        self, input_ids: torch.Tensor, features: torch.Tensor | None, positions: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Arm the FIRE hooks for one forward. ``positions`` [N, 2] of the image tokens may come
        precomputed from the CPU side; finding them on the GPU costs a synchronisation."""
        if features is None:
            self._injection = None
        else:
            if positions is None:
                positions = (input_ids == self.image_token_id).nonzero()
            self._injection = (input_ids.shape, positions[:, 0], positions[:, 1], features)
        try:
            yield
        finally:
            self._injection = None

    # -- forward ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.head[1].weight.device

    def encode_images(self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> tuple[Any, Any]:
        """Vision-encoder outputs for the LLM, and FIRE's local features (or None)."""
        if pixel_values is None:
            return None, None
        want_states = self.fire is not None
        vision = self.backbone.model.get_image_features(
            pixel_values, image_grid_thw, output_hidden_states=want_states, return_dict=True
        )
        features = None
        if want_states:
            # hidden_states[i] is the output of vision block i.
            states = [vision.hidden_states[i] for i in self.fire_vision_layers]
            features = self.fire.local_features(states)
            order = self._merged_token_order(image_grid_thw)
            if order is not None:
                features = features[:, order]
        return vision, features

    def leading_images(
        self, encoded: tuple[Any, Any], image_grid_thw: torch.Tensor, input_ids: torch.Tensor, rows: int
    ) -> tuple[tuple[Any, Any], torch.Tensor]:
        """``encode_images``' outputs (and the grid) of the images in a batch's first ``rows`` rows,
        for a second pass over those rows that then needs no vision pass of its own (a batch's
        images come in row order)."""
        vision, features = encoded
        tokens = int((input_ids[:rows] == self.image_token_id).sum())
        merge = self.backbone.model.visual.spatial_merge_size ** 2
        ends = (image_grid_thw.prod(-1) // merge).cumsum(0).tolist()
        count = sum(end <= tokens for end in ends)
        if tokens and ends[count - 1] != tokens:
            raise ValueError(f"the first {rows} rows hold {tokens} image tokens, not a whole number of images")
        shared = type(vision)(pooler_output=vision.pooler_output[:count])
        return (shared, None if features is None else features[:, :tokens]), image_grid_thw[:count]

    def _merged_token_order(self, image_grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL runs its vision blocks in window order and restores the image order only
        after the merger; FIRE's features, taken inside, need the same restoring permutation."""
        visual = self.backbone.model.visual
        if not hasattr(visual, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            image_grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return torch.argsort(window_index)

    def rope_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Qwen-VL's 3D (time, height, width) rotary positions [3, B, S] for a batch of prompts.

        Call it on CPU tensors before moving a batch to the GPU: transformers computes these row by
        row in Python, which on the GPU would stall it once per row.
        """
        if image_grid_thw is None:
            return None  # text only: the model's own 1D positions are right
        token_types = (input_ids == self.image_token_id).int()
        # A row's positions depend only on its layout (padding, token types) and its images' grids,
        # and catalog batches repeat layouts (one photo size, similar prompts): each distinct row is
        # computed once, by transformers, and copied to the rows that share it.
        types, mask = token_types.cpu().numpy(), attention_mask.cpu().numpy()
        image_starts = (types == 1) & (np.pad(types, ((0, 0), (1, 0)))[:, :-1] == 0) & (mask == 1)
        ends = np.cumsum(image_starts.sum(axis=1))
        starts = ends - image_starts.sum(axis=1)  # each row's images: image_grid_thw[starts[row]:ends[row]]
        grids = image_grid_thw.cpu().numpy()
        rows_by_layout: dict[bytes, list[int]] = {}
        for row in range(types.shape[0]):
            key = types[row].tobytes() + mask[row].tobytes() + grids[starts[row]:ends[row]].tobytes()
            rows_by_layout.setdefault(key, []).append(row)
        positions = torch.zeros((3, *input_ids.shape), dtype=input_ids.dtype, device=input_ids.device)
        for rows in rows_by_layout.values():
            row = rows[0]
            computed, _ = self.backbone.model.get_rope_index(
                input_ids[row:row + 1], mm_token_type_ids=token_types[row:row + 1],
                image_grid_thw=image_grid_thw[starts[row]:ends[row]], attention_mask=attention_mask[row:row + 1],
            )
            positions[:, rows] = computed
        return positions

    def _image_inputs(self, input_ids, vision, image_grid_thw, rope=None) -> dict[str, Any]:
        """The backbone's image arguments: the precomputed vision outputs, and either the 3D
        positions or what transformers needs to derive them (the grid and the image-token types)."""
        if vision is None:
            return {"position_ids": rope} if rope is not None else {}
        inputs: dict[str, Any] = {"mm_encoder_outputs": {"image": vision}}
        if rope is not None:
            inputs["position_ids"] = rope
        else:
            inputs["image_grid_thw"] = image_grid_thw
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        return inputs

    def _llm_states(
        self, input_ids, attention_mask, vision, features, image_grid_thw, image_positions=None, rope=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states [B, S, H] and the raw input states (vision scattered in) [B, S, H].

        ``rope``: precomputed 3D positions; without them transformers derives them from the image
        grid and the image-token types.
        """
        raw = self._raw_states(input_ids, vision)
        with self._injecting(input_ids, features, image_positions):
            out = self.backbone.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                **self._image_inputs(input_ids, vision, image_grid_thw, rope),
            )
        return out.last_hidden_state, raw

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        reasoning: bool | None = None,
        dim: int | None = None,
        image_positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        encoded_images: tuple[Any, Any] | None = None,
    ) -> Moon3Output:
        """Embed a batch. ``input_ids`` are left-padded prompts ending in ``<think>``;
        ``image_positions`` [N, 2] (row, column) of their image tokens and ``position_ids`` (from
        ``rope_positions``) may come precomputed; both are derived here otherwise, and so are
        ``encoded_images`` (``encode_images(pixel_values, image_grid_thw)``, which a trainer
        shares with another objective's pass over the same images)."""
        reasoning = self.config.reasoning if reasoning is None else reasoning
        if encoded_images is None:
            encoded_images = self.encode_images(pixel_values, image_grid_thw)
        vision, features = encoded_images
        texts: list[str | None] = [None] * input_ids.shape[0]
        if reasoning:
            full_ids, full_mask, texts = self._reason(
                input_ids, attention_mask, vision, features, image_grid_thw, image_positions
            )
            image_positions = full_rope = None  # rows were re-padded around the reasoning
        else:
            tail = torch.tensor([self.think_end_id, self.embed_token_id], device=input_ids.device)
            full_ids = torch.cat([input_ids, tail.expand(input_ids.shape[0], 2)], dim=1)
            full_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :2])], dim=1)
            full_rope = None
            if position_ids is not None:  # the two tail tokens are text: one position after another
                last = position_ids[..., -1:]
                full_rope = torch.cat([position_ids, last + 1, last + 2], dim=-1)
        states, raw = self._llm_states(
            full_ids, full_mask, vision, features, image_grid_thw, image_positions, full_rope
        )
        pooled = states[:, -1]  # left padding: the embedding token is last in every row
        gates = None
        if self.mhmf is not None:
            # MHMF reads the raw prompt (not the reasoning): it is what the product shows and says.
            prompt_raw = self._raw_states(input_ids, vision) if reasoning else raw[:, : input_ids.shape[1]]
            vision_mask = input_ids == self.image_token_id
            text_mask = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
            fused, gates = self.mhmf(prompt_raw, vision_mask, text_mask)
            pooled = pooled + fused.to(pooled.dtype)
        embeddings = F.normalize(self.head(pooled).float(), dim=-1)
        if dim is not None:
            embeddings = truncate(embeddings, dim)
        return Moon3Output(embeddings, texts, gates)

    def _raw_states(self, input_ids: torch.Tensor, vision: Any) -> torch.Tensor:
        """What the LLM receives before its first layer: token embeddings with the vision features in."""
        raw = self.backbone.get_input_embeddings()(input_ids)
        if vision is not None:
            image_embeds = torch.cat(vision.pooler_output, dim=0).to(raw.dtype)
            raw = raw.masked_scatter((input_ids == self.image_token_id)[..., None], image_embeds)
        return raw

    # -- reasoning --------------------------------------------------------------------------------

    def _reason(self, input_ids, attention_mask, vision, features, image_grid_thw, positions=None):
        """Generate the attribute reasoning, then rebuild each row as prompt + reasoning + </think><|emb|>."""
        budget = self.config.prompt.max_reasoning_tokens
        pad_id = self.tokenizer.pad_token_id
        with self._injecting(input_ids, features, positions):
            generated = self.backbone.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **self._image_inputs(input_ids, vision, image_grid_thw),
                max_new_tokens=budget,
                do_sample=False,
                eos_token_id=[self.think_end_id, self.tokenizer.eos_token_id],
                pad_token_id=pad_id,
            )[:, input_ids.shape[1] :]
        stop = {self.think_end_id, self.tokenizer.eos_token_id, pad_id}
        rows, texts = [], []
        for b in range(input_ids.shape[0]):
            reasoning = []
            for token in generated[b].tolist():
                if token in stop:
                    break
                if token in (self.embed_token_id, self.image_token_id):
                    continue  # never let the model place these itself
                reasoning.append(token)
            prompt = input_ids[b][attention_mask[b].bool()].tolist()
            rows.append(prompt + reasoning + [self.think_end_id, self.embed_token_id])
            texts.append(self.tokenizer.decode(reasoning, skip_special_tokens=True).strip())
        length = max(len(r) for r in rows)  # left-pad again: the embedding token ends every row
        ids = torch.full((len(rows), length), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            ids[b, length - len(row) :] = torch.tensor(row, device=ids.device)
            mask[b, length - len(row) :] = 1
        return ids, mask, texts


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """Matryoshka truncation: the first ``dim`` components, re-normalised."""
    if not 0 < dim <= embeddings.shape[-1]:
        raise ValueError(f"cannot truncate {embeddings.shape[-1]}-d embeddings to {dim}")
    return F.normalize(embeddings[..., :dim], dim=-1)


def parse_attributes(reasoning: str | None) -> dict[str, str]:
    """``"category: dress; color: red"`` -> ``{"category": "dress", "color": "red"}``; other text is ignored."""
    attributes: dict[str, str] = {}
    for part in (reasoning or "").replace("\n", ";").split(";"):
        key, sep, value = part.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and key and value and len(key) <= 40 and key not in attributes:
            attributes[key] = value[:200]
    return attributes
