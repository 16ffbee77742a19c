"""Per-label figure-ground maps: pairing, targets, loss and the merge into class logits.

Shared by the decoupled methods (DecoupledNet, Hong et al. NeurIPS 2015; TransferNet, Hong et al.
CVPR 2016): both segment one *(image, label)* pair at a time into a 2-channel (background,
foreground) map and merge the maps of an image's identified labels into (N, C, H, W) class logits.
This module is the one place for that math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raysemiseg.methods.losses import masked_cross_entropy  # noqa: F401 (re-exported)

#: logit given to classes that are not among an image's identified labels (fp16-safe)
ABSENT_LOGIT = -1.0e4


def present_pairs(image_labels: Tensor, fg_ids: Tensor, rows: Tensor | None = None,
                  max_pairs: int | None = None) -> tuple[Tensor, Tensor]:
    """(image, label) pairs for the foreground labels present in each row.

    Args:
        image_labels: (N, K) float multi-hot over the label space (background column ignored).
        fg_ids: (K',) int64 foreground class ids of the label space.
        rows: optional (N,) bool; only these rows give pairs.
        max_pairs: keep at most this many pairs (the first ones, row-major) to bound memory.

    Returns:
        ``(pair_img, pair_cls)``: (P,) int64 row indices and (P,) int64 *label-space* class ids.
    """
    present = image_labels[:, fg_ids] > 0.5
    if rows is not None:
        present = present & rows[:, None]
    n, j = present.nonzero(as_tuple=True)
    if max_pairs is not None and n.numel() > max_pairs:
        n, j = n[:max_pairs], j[:max_pairs]
    return n, fg_ids[j]


def binary_targets(masks: Tensor, pair_img: Tensor, pair_cls: Tensor, ignore_index: int = 255) -> Tensor:
    """Figure-ground targets of each pair: 1 where the row's mask is the pair's class, 0 on every
    other labelled pixel, ``ignore_index`` on void pixels.

    Args:
        masks: (N, H, W) int64 class-id masks.
        pair_img, pair_cls: (P,) int64 from :func:`present_pairs`.

    Returns:
        (P, H, W) int64 in {0, 1, ignore_index}.
    """
    m = masks[pair_img]
    t = (m == pair_cls[:, None, None]).long()
    return torch.where(m == ignore_index, torch.full_like(t, ignore_index), t)


def identified_labels(scores: Tensor, fg_ids: Tensor, num_classes: int, threshold: float = 0.5,
                      fallback_top1: bool = True) -> Tensor:
    """Labels an image-level classifier identifies: sigmoid(score) > threshold.

    Args:
        scores: (N, K') logits over the foreground classes.
        fg_ids: (K',) foreground class ids (label space ids of the score columns).
        num_classes: K, the label space's size.
        fallback_top1: where no score passes, keep the single best label (else the image is all
            background).

    Returns:
        (N, K) float32 multi-hot over the label space (background column 0).
    """
    prob = torch.sigmoid(scores.float())
    keep = prob > threshold
    if fallback_top1:
        none = ~keep.any(dim=1)
        top = prob.argmax(dim=1)
        keep[none, top[none]] = True
    out = torch.zeros(scores.shape[0], num_classes, device=scores.device)
    out[:, fg_ids] = keep.float()
    return out


def combine_binary_maps(pair_logits: Tensor, pair_img: Tensor, pair_cls: Tensor, num_images: int,
                        num_classes: int, background_id: int, background_logits: Tensor | None = None) -> Tensor:
    """Merge per-label figure-ground maps into class logits (DecoupledNet Sec. 4.3 inference).

    For pair p of image n and class l, ``log M_f(g^l) = log p_fg`` becomes the logit of class l;
    classes without a pair get :data:`ABSENT_LOGIT`; an image without pairs is all background
    (logit 0 = log 1). The background logit is

    * with ``background_logits`` (DecoupledNet Sec. 4.3): the given per-image background map, the
      paper's ``M_b(g*)`` with g* the bridge output for *all* identified labels, as (N, 2, H, W)
      figure-ground logits of that union pair (channel 0 used), so the final label is
      ``argmax({M_f(g^l)}_l ∪ {M_b(g*)})``;
    * without (TransferNet; DecoupledNet's ``background: min`` option):
      ``min_l log p_bg(l) = log(1 - max_l p_fg(l))``, so a pixel goes to background exactly when no
      identified label's foreground probability exceeds 0.5.

    Args:
        pair_logits: (P, 2, H, W) float logits, channel 0 = background, 1 = foreground.
        pair_img: (P,) int64 row of each pair in ``0..num_images-1``.
        pair_cls: (P,) int64 class id of each pair (distinct per image).
        background_logits: optional (num_images, 2, H, W) float figure-ground logits of each
            image's union pair; rows of images without pairs are not read.

    Returns:
        (num_images, num_classes, H, W) float32 log-probability-like logits.

    Raises:
        ValueError: ``background_logits`` of the wrong shape.
    """
    p, _, h, w = pair_logits.shape
    logp = F.log_softmax(pair_logits.float(), dim=1)
    out = torch.full((num_images, num_classes, h, w), ABSENT_LOGIT, device=pair_logits.device)
    bg = torch.zeros(num_images, h, w, device=pair_logits.device)
    if p:
        if background_logits is not None:
            if tuple(background_logits.shape) != (num_images, 2, h, w):
                raise ValueError(f"background_logits {tuple(background_logits.shape)} != {(num_images, 2, h, w)}")
            has = torch.zeros(num_images, dtype=torch.bool, device=pair_logits.device)
            has[pair_img] = True
            union_bg = F.log_softmax(background_logits.float(), dim=1)[:, 0]
            bg = torch.where(has[:, None, None], union_bg, bg)
        else:
            bg.scatter_reduce_(0, pair_img.view(p, 1, 1).expand(p, h, w), logp[:, 0], reduce="amin", include_self=True)
        out[pair_img, pair_cls] = logp[:, 1]
    out[:, background_id] = bg
    return out
