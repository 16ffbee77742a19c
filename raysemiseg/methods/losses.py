"""Pixel losses shared by every method: one masked cross-entropy (the M-step of WSSL Alg. 1,
the strong-row loss of strong_only, the per-label loss of DecoupledNet/TransferNet/L-Net).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_to(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize (N, C, h, w) logits to (N, C, *size) (no-op when already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255,
                         normalizer: Tensor | int | None = None) -> Tensor:
    """Mean per-pixel cross-entropy over the non-ignored pixels (the M-step loss).

    Args:
        logits: (N, C, h, w) float class scores; resized bilinearly to the target's (H, W).
        target: (N, H, W) int64 labels in 0..C-1 or ``ignore_index``.
        ignore_index: label excluded from the loss (VOC void, rows without supervision).
        normalizer: divide the summed CE by this pixel count instead of ``target``'s own number of
            valid pixels (e.g. the valid pixels of the whole mixed batch, so that the strong and
            weak parts add up to one pooled mean: WSSL Eq. 1). Clamped to >= 1.

    Returns:
        Scalar: ``sum_valid CE / max(normalizer or #valid, 1)``. With no valid pixel (or no rows)
        it is an exact 0 that is still connected to the graph, so a batch without rows of one kind
        never yields NaN and every parameter still receives a (zero) gradient.

    Raises:
        ValueError: when the batch sizes of ``logits`` and ``target`` differ.
    """
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits rows {logits.shape[0]} != target rows {target.shape[0]}")
    logits = upsample_to(logits, tuple(target.shape[-2:]))
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum() if normalizer is None else torch.as_tensor(normalizer)
    return total / count.clamp(min=1)
