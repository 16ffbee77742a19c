"""Losses and target selection of WSSL (Papandreou et al., ICCV 2015), shared with dual-branch.

The M-step of Alg. 1 is plain per-pixel cross-entropy against the current targets; this module
holds the rule that picks each row's target (strong mask, stored pseudo label or online E-step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raysemiseg.methods.losses import masked_cross_entropy, upsample_to  # noqa: F401 (re-exported)

#: per-row target source codes returned by :func:`select_targets`
SOURCE_STRONG, SOURCE_PSEUDO, SOURCE_ESTEP, SOURCE_NONE = 0, 1, 2, 3


def has_labels(masks: Tensor, ignore_index: int = 255) -> Tensor:
    """(N, H, W) int masks -> (N,) bool, True where a row has at least one non-ignored pixel."""
    return (masks != ignore_index).flatten(1).any(dim=1)


def box_regions(box_masks: Tensor, num_classes: int, ignore_index: int = 255,
                background_index: int | None = 0) -> Tensor:
    """Per-class "inside a box of class k" masks for Bbox-EM-Fixed (Papandreou et al. Sec. 4.2).

    Args:
        box_masks: (N, H, W) int64 Bbox-Rect renderings (class id inside boxes, background
            outside, ``ignore_index`` for rows without boxes).
        num_classes: K.
        ignore_index: marks rows (or pixels) without box information.
        background_index: the background id (its channel is always allowed).

    Returns:
        (N, K, H, W) bool. Rows without any box pixel are all True, so those rows fall back to
        the image-level E-step instead of being forced to background.
    """
    ids = torch.arange(num_classes, device=box_masks.device).view(1, -1, 1, 1)
    region = box_masks.unsqueeze(1) == ids
    in_box = box_masks != ignore_index
    if background_index is not None:
        in_box &= box_masks != background_index
    region[~in_box.flatten(1).any(dim=1)] = True
    if background_index is not None:
        region[:, background_index] = True
    return region


def select_targets(
    masks: Tensor,
    pseudo: Tensor,
    is_strong: Tensor,
    estep_labels: Tensor | None,
    ignore_index: int = 255,
    use_label_store: bool = True,
) -> tuple[Tensor, Tensor]:
    """Each row's training target, by precedence (documented rule of the ``wssl`` method).

    1. strong rows (``is_strong``): their pixel mask;
    2. weak rows with a stored pseudo label (any non-ignored pixel in ``pseudo``, e.g. a
       Bbox-Rect / Bbox-Seg / offline EM label store) when ``use_label_store``: that label;
    3. other weak rows: the online E-step's labels (``estep_labels``) when given;
    4. otherwise: all ``ignore_index`` (the row contributes nothing).

    Args:
        masks, pseudo: (N, H, W) int64.
        is_strong: (N,) bool.
        estep_labels: (N, H, W) int64 or None.

    Returns:
        (targets (N, H, W) int64, source (N,) int64 with codes ``SOURCE_*``).
    """
    n = masks.shape[0]
    source = torch.full((n,), SOURCE_NONE, dtype=torch.long, device=masks.device)
    targets = torch.full_like(masks, ignore_index)
    strong = is_strong.to(torch.bool)
    targets[strong] = masks[strong]
    source[strong] = SOURCE_STRONG
    weak = ~strong
    if use_label_store:
        stored = weak & has_labels(pseudo, ignore_index)
        targets[stored] = pseudo[stored]
        source[stored] = SOURCE_PSEUDO
        weak = weak & ~stored
    if estep_labels is not None:
        targets[weak] = estep_labels[weak]
        source[weak] = SOURCE_ESTEP
    return targets, source
