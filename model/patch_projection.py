"""Qwen-VL's patch embedding as the single matrix product it is.

The vision tower embeds each flattened 2x14x14 patch with a Conv3d whose kernel equals its stride:
one output position per patch, no overlap, no padding, i.e. a linear layer over the patch's pixels.
On CPU, oneDNN's 3D convolution of a training batch (thousands of patches) costs ~15 ms forward
and as much backward; the same product as ``linear`` costs well under 1 ms. On GPU it spares the
cuDNN convolution path too. The weight keeps the convolution's shape and name, so checkpoints
(ours and Hugging Face's) load unchanged and ZeRO-3 still gathers it with its module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PatchProjection(nn.Conv3d):
    """A Conv3d over inputs exactly one kernel in size, computed as ``linear``."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if tuple(patches.shape[2:]) != tuple(self.kernel_size):
            return super().forward(patches)  # more than one position per input: a real convolution
        out = F.linear(patches.flatten(1), self.weight.flatten(1), self.bias)
        return out.view(*out.shape, 1, 1, 1)


def use_linear_patch_projection(backbone: Any) -> bool:
    """Compute the backbone's patch embedding as ``linear`` (same weights, same results).
    Returns False, changing nothing, where the projection is not a non-overlapping Conv3d."""
    conv = getattr(getattr(backbone.model.visual, "patch_embed", None), "proj", None)
    plain = (
        type(conv) is nn.Conv3d and conv.kernel_size == conv.stride and conv.groups == 1
        and not any(conv.padding) and conv.dilation == (1, 1, 1)
    )
    if plain:
        conv.__class__ = PatchProjection  # same parameters and state-dict names; only forward differs
    return plain
