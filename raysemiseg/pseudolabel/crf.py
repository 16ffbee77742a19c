"""Fully connected CRF refinement (Krahenbuhl & Koltun, NIPS 2011) via pydensecrf, label-restricted.

Energy (Krahenbuhl & Koltun Eq. 1-3)::

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j)
    psi_u(x_i) = -ln P(x_i)                                (unary from probabilities)
    k(f_i, f_j) = w_bi  * exp(-|p_i - p_j|^2 / 2 bi_sxy^2 - |I_i - I_j|^2 / 2 bi_srgb^2)   (appearance)
                + w_pos * exp(-|p_i - p_j|^2 / 2 pos_sxy^2)                               (smoothness)

with the Potts compatibility ``mu`` and ``iterations`` mean-field steps (the paper's efficient
inference; 10 as in DeepLab). Defaults are DeepLab-CRF-LargeFOV's published values
(Chen et al., ICLR 2015, deeplab-public README): ``bi_w = 4, bi_xy_std = 121, bi_rgb_std = 5,
pos_w = 3, pos_xy_std = 3`` (pixel units; RGB in 0..255).

Label restriction: the CRF's cost grows with the number of labels it carries, so it runs over the
background + the image's present labels only (P rows; :func:`restrict_probs` cuts a full-space
probability map down), and the result is mapped back to label-space ids. Nothing costs
O(size of the label space) per image.

Clamped pixels (used by Bbox-Seg, Papandreou et al. 2015 Sec. 4.2): pixels whose label is given
get a near-certain unary (``1 - clamp_eps``) and are re-set to that label after inference, so the
constraint holds exactly.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CRFParams", "crf_labels", "dense_crf", "restrict_probs"]


class CRFParams(BaseModel):
    """Dense-CRF parameters (DeepLab-CRF-LargeFOV defaults).

    Attributes:
        iterations: mean-field iterations (DeepLab: 10).
        pos_w, pos_sxy: weight and spatial std (pixels) of the Gaussian smoothness kernel.
        bi_w, bi_sxy, bi_srgb: weight, spatial std (pixels) and colour std (0..255 units) of the
            bilateral appearance kernel.
        prob_floor: probabilities are clipped to at least this before ``-ln`` (avoids inf).
        scale: run inference on the image resized by this factor (spatial stds scaled with it),
            then upsample the marginals bilinearly (1.0 = full resolution, as DeepLab; 0.5 is
            about 4x faster).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(10, ge=1)
    pos_w: float = 3.0
    pos_sxy: float = 3.0
    bi_w: float = 4.0
    bi_sxy: float = 121.0
    bi_srgb: float = 5.0
    prob_floor: float = Field(1e-8, gt=0, lt=1)
    scale: float = Field(1.0, gt=0, le=1)


def restrict_probs(probs: np.ndarray, class_ids: np.ndarray | list[int]) -> np.ndarray:
    """Rows ``class_ids`` of a full-space probability map, renormalised to sum to 1 per pixel.

    Args:
        probs: (K, H, W) float probabilities over a K-class space.
        class_ids: (P,) ids to keep (background + present labels).

    Returns:
        (P, H, W) float32, summing to 1 over P at every pixel (uniform where all kept rows are 0).
    """
    sub = np.asarray(probs, dtype=np.float32)[np.asarray(class_ids)]
    tot = sub.sum(axis=0, keepdims=True)
    p = sub.shape[0]
    return np.where(tot > 0, sub / np.maximum(tot, 1e-30), 1.0 / p).astype(np.float32)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    params: CRFParams | None = None,
    clamp: np.ndarray | None = None,
    clamp_eps: float = 1e-5,
) -> np.ndarray:
    """Mean-field inference of the dense CRF over P labels.

    Args:
        image: (H, W, 3) uint8 RGB.
        probs: (P, H, W) float probabilities (each pixel's column sums to ~1), P >= 1.
        params: :class:`CRFParams`.
        clamp: optional (H, W) int array of row indices 0..P-1 to fix, -1 where free.
        clamp_eps: probability mass left to the other labels at clamped pixels.

    Returns:
        (P, H, W) float32 marginals Q (sum to 1 per pixel); clamped pixels are one-hot.

    Raises:
        ValueError: if shapes disagree or ``clamp`` holds an index outside -1..P-1.
    """
    import pydensecrf.densecrf as dcrf

    params = params or CRFParams()
    img = np.ascontiguousarray(image, dtype=np.uint8)
    if not img.flags.writeable:  # pydensecrf needs a writable buffer (decoded PIL arrays are read-only)
        img = img.copy()
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {img.shape}")
    pr = np.asarray(probs, dtype=np.float32)
    if pr.ndim != 3 or pr.shape[1:] != img.shape[:2]:
        raise ValueError(f"probs must be (P, H, W) with (H, W) = {img.shape[:2]}, got {pr.shape}")
    p, h, w = pr.shape
    if clamp is not None:
        clamp = np.asarray(clamp)
        if clamp.shape != (h, w) or clamp.min(initial=-1) < -1 or clamp.max(initial=-1) >= p:
            raise ValueError(f"clamp must be (H, W) = {(h, w)} with values in -1..{p - 1}")
        if p > 1:
            fixed = clamp >= 0
            hard = np.full((p, h, w), clamp_eps / (p - 1), dtype=np.float32)
            np.put_along_axis(hard, np.where(fixed, clamp, 0)[None], 1.0 - clamp_eps, axis=0)
            pr = np.where(fixed[None], hard, pr)
    if p == 1:
        return np.ones((1, h, w), dtype=np.float32)
    s = params.scale
    wi, hi, im = w, h, img
    if s < 1.0:
        from PIL import Image

        wi, hi = max(1, round(w * s)), max(1, round(h * s))
        im = np.array(Image.fromarray(img).resize((wi, hi), Image.BILINEAR), dtype=np.uint8, order="C")
        pr = _resize_maps(pr, hi, wi)
    unary = -np.log(np.clip(pr, params.prob_floor, 1.0)).reshape(p, -1)
    crf = dcrf.DenseCRF2D(wi, hi, p)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.pos_sxy * s, compat=params.pos_w)
    crf.addPairwiseBilateral(sxy=params.bi_sxy * s, srgb=params.bi_srgb, rgbim=im, compat=params.bi_w)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(p, hi, wi)
    if s < 1.0:
        q = _resize_maps(q, h, w)
    if clamp is not None:
        fixed = clamp >= 0
        onehot = np.zeros_like(q)
        np.put_along_axis(onehot, np.where(fixed, clamp, 0)[None], 1.0, axis=0)
        q = np.where(fixed[None], onehot, q)
    return q


def _resize_maps(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of (P, h0, w0) maps to (P, h, w), renormalised to sum to 1 per pixel."""
    import torch
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[None], size=(h, w), mode="bilinear",
                      align_corners=False)[0].numpy()
    return (t / np.maximum(t.sum(axis=0, keepdims=True), 1e-12)).astype(np.float32)


def crf_labels(
    image: np.ndarray,
    probs: np.ndarray,
    class_ids: np.ndarray | list[int],
    params: CRFParams | None = None,
    clamp: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense-CRF refined labels in label-space ids (present-labels layout).

    Args:
        image: (H, W, 3) uint8 RGB.
        probs: (P, H, W) probabilities over ``class_ids`` (use :func:`restrict_probs` to cut a
            full-space map down to background + present labels).
        class_ids: (P,) label-space ids of the rows.
        params: :class:`CRFParams`.
        clamp: optional (H, W) row indices to fix (-1 = free), see :func:`dense_crf`.

    Returns:
        ``(labels, confidence)``: (H, W) int64 label-space ids and (H, W) float32 max marginal.
    """
    ids = np.asarray(class_ids, dtype=np.int64)
    if ids.shape != (np.asarray(probs).shape[0],):
        raise ValueError(f"class_ids {ids.tolist()} must have one id per probs row ({np.asarray(probs).shape[0]})")
    q = dense_crf(image, probs, params, clamp=clamp)
    return ids[q.argmax(axis=0)], q.max(axis=0)
