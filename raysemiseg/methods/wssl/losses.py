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


def unpack_box_bits(box_bits: Tensor, num_classes: int) -> Tensor:
    """(N, ceil(K/8), H, W) uint8 box bits -> (N, K, H, W) bool per-class box regions.

    Bit ``c % 8`` of byte ``c // 8`` is set where the pixel lies inside a box of class ``c``
    (:func:`raysemiseg.train.data.render_box_bits`, numpy ``packbits`` little bit order).

    Raises:
        ValueError: the number of bytes does not match ``num_classes``.
    """
    n, nb, h, w = box_bits.shape
    if nb != (num_classes + 7) // 8:
        raise ValueError(f"box_bits has {nb} bytes per pixel, {num_classes} classes need {(num_classes + 7) // 8}")
    shifts = torch.arange(8, dtype=torch.uint8, device=box_bits.device).view(1, 1, 8, 1, 1)
    bits = (box_bits.to(torch.uint8).unsqueeze(2) >> shifts) & 1
    return bits.reshape(n, nb * 8, h, w)[:, :num_classes].to(torch.bool)


def box_regions(box_masks: Tensor, num_classes: int, ignore_index: int = 255,
                background_index: int | None = 0, box_bits: Tensor | None = None) -> Tensor:
    """Per-class "inside a box of class k" masks for Bbox-EM-Fixed (Papandreou et al. Sec. 3.3).

    Args:
        box_masks: (N, H, W) int64 Bbox-Rect renderings (class id inside boxes, background
            outside, ``ignore_index`` on padding and on every pixel of rows WITHOUT boxes). A row
            has boxes when any pixel is not ``ignore_index`` (every crop holds image pixels).
        num_classes: K.
        ignore_index: marks rows without box information (and padding).
        background_index: the background id (its channel is always allowed).
        box_bits: optional (N, ceil(K/8), H, W) uint8 per-class box bits
            (:func:`unpack_box_bits`); without them the regions come from ``box_masks``, where a
            smaller box hides the class of a larger box it overlaps.

    Returns:
        (N, K, H, W) bool. Rows without boxes are all True (they fall back to the image-level
        E-step). Rows with boxes allow class k only inside its boxes, so a crop of a boxed image
        with no box pixel allows the background only (known background).

    Raises:
        ValueError: ``box_bits`` rows or size differ from ``box_masks``.
    """
    n, h, w = box_masks.shape
    if box_bits is not None:
        if box_bits.shape[0] != n or tuple(box_bits.shape[-2:]) != (h, w):
            raise ValueError(f"box_bits {tuple(box_bits.shape)} does not match box_masks {tuple(box_masks.shape)}")
        region = unpack_box_bits(box_bits, num_classes)
    else:
        ids = torch.arange(num_classes, device=box_masks.device).view(1, -1, 1, 1)
        region = box_masks.unsqueeze(1) == ids
    has_boxes = (box_masks != ignore_index).flatten(1).any(dim=1)
    region[~has_boxes] = True
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
