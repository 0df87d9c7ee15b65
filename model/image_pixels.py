"""Qwen-VL image preprocessing: the numbers of transformers' PIL image processor, batched.

``Qwen2VLImageProcessorPil`` resizes, rescales, normalises and patchifies one image at a time
through several layers of validation and format conversion: ~0.7 ms per small product photo on
this project's 2-core CPU, a third of a MOON3.0 training step. The same arithmetic on a whole list
of images (PIL's resize per image, then one NumPy pass per image size) gives bit-identical pixels
(tests/test_moon3.py compares them) in a fraction of the time. The processor's own settings
(patch and merge sizes, mean, std, resampling, a local model's ``preprocessor_config.json``) are
read from it; a processor configured otherwise (no resize, rescale or normalise) is called as is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _fast_path_applies(processor: Any) -> bool:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return (
        isinstance(processor, Qwen2VLImageProcessorPil)
        and all(getattr(processor, flag, False) for flag in ("do_resize", "do_rescale", "do_normalize"))
        and not getattr(processor, "do_center_crop", False)
        and not getattr(processor, "do_pad", False)
    )


@functools.lru_cache(maxsize=8)
def _level_tables(rescale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> list[np.ndarray]:
    """Per channel, the normalised value of each 8-bit level, by transformers' own arithmetic:
    rescale in float64, cast to float32, then ``(x - mean) / std`` in float32."""
    levels = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    means, stds = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return [(levels - means[c]) / stds[c] for c in range(len(means))]


def qwen_vl_pixels(
    processor: Any, images: Sequence[Any], min_pixels: int, max_pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` (patches x patch_dim, float32) and ``image_grid_thw`` of RGB PIL ``images``,
    resized to between ``min_pixels`` and ``max_pixels`` as the processor would."""
    if not images:
        raise ValueError("qwen_vl_pixels needs at least one image")
    if not _fast_path_applies(processor):
        out = processor(images=list(images), size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                        return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    resized = []
    for image in images:
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = smart_resize(image.height, image.width, factor=patch * merge,
                                     min_pixels=min_pixels, max_pixels=max_pixels)
        resized.append(np.asarray(image.resize((width, height), resample=processor.resample)))
    tables = _level_tables(float(processor.rescale_factor), tuple(processor.image_mean), tuple(processor.image_std))
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, array in enumerate(resized):
        by_size.setdefault(array.shape[:2], []).append(index)
    patches: list[np.ndarray | None] = [None] * len(resized)
    grids = np.zeros((len(resized), 3), dtype=np.int64)
    for (height, width), indices in by_size.items():
        stack = np.stack([resized[i] for i in indices]).transpose(3, 0, 1, 2)  # (C, n, H, W) uint8
        pixels = np.stack([np.take(table, channel) for table, channel in zip(tables, stack)], axis=1)
        grid_h, grid_w = height // patch, width // patch
        count, channels = len(indices), len(tables)
        blocks = pixels.reshape(count, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        # (n, gh, gw, mh, mw, C, ph, pw): merge-window order, channel-first within a patch
        blocks = blocks.transpose(0, 2, 5, 3, 6, 1, 4, 7)
        # a still image fills every temporal slot of a patch with the same frame
        blocks = np.broadcast_to(blocks[:, :, :, :, :, :, None], (*blocks.shape[:6], temporal, patch, patch))
        flat = blocks.reshape(count, grid_h * grid_w, channels * temporal * patch * patch)
        for row, index in enumerate(indices):
            patches[index] = flat[row]
            grids[index] = (1, grid_h, grid_w)
    return torch.from_numpy(np.concatenate(patches)), torch.from_numpy(grids)
