"""Batched attention for the vision tower: one SDPA call per distinct image size, not per image.

Qwen2-VL's vision encoder packs every image of a batch into one sequence. Without the flash-attn
package (not installable here), transformers attends image by image: a batch of 256 product images
through 32 blocks is ~8,000 tiny kernel launches, and the GPU idles while Python issues them.
Catalog images come in few sizes, so grouping the images by length and running one batched SDPA
per group gives the same result with a handful of launches.

The function is registered in transformers' AttentionInterface. Its name contains "flash" on
purpose: that is how transformers decides to pass the packed-sequence boundaries (``cu_seqlens``)
instead of splitting the batch itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "moon3_flash_grouped_sdpa"
# Not cuDNN: it builds an execution plan per new shape, and group sizes change with every batch.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _groups(cu_seqlens: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(length, positions [n_images, length]) per distinct image length; cached on the tensor,
    which every block of one forward pass shares."""
    cached = getattr(cu_seqlens, "_moon3_groups", None)
    if cached is not None:
        return cached
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        by_length.setdefault(end - start, []).append(start)
    groups = []
    for length, starts in by_length.items():
        if length == 0:
            continue
        offsets = torch.arange(length, device=cu_seqlens.device)
        positions = torch.tensor(starts, device=cu_seqlens.device)[:, None] + offsets[None, :]
        groups.append((length, positions))
    cu_seqlens._moon3_groups = groups  # type: ignore[attr-defined]
    return groups


def grouped_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed image. Inputs [1, heads, total, dim]; output [1, total, heads, dim]."""
    if cu_seq_lens_q is None:
        raise ValueError(f"{NAME} is for the packed vision tower and needs cu_seq_lens_q")
    _, heads, total, dim = query.shape
    out = torch.empty((total, heads, dim), dtype=query.dtype, device=query.device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [total, heads, dim]
    for length, positions in _groups(cu_seq_lens_q):
        flat = positions.reshape(-1)
        # [images, heads, length, dim] for one SDPA call over all images of this length
        qg, kg, vg = (t.index_select(0, flat).view(-1, length, heads, dim).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(_BACKENDS):
            attended = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scaling)
        out.index_copy_(0, flat, attended.transpose(1, 2).reshape(-1, heads, dim))
    return out.unsqueeze(0), None


def use_grouped_vision_attention(backbone: Any) -> None:
    """Switch the backbone's vision tower to grouped attention; the language model keeps SDPA."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_varlen_attention)
    backbone.set_attn_implementation({"vision_config": NAME, "text_config": "sdpa"})
