"""Pseudo labels from bounding boxes: Bbox-Rect and Bbox-Seg (Papandreou et al., ICCV 2015, Sec. 3.3; alpha in Sec. 4.4).

* **Bbox-Rect**: every pixel inside a box takes the box's class; pixels in several boxes take the
  class of the smallest (by area) box; pixels outside all boxes are background.
* **Bbox-Seg**: a dense CRF (Krahenbuhl & Koltun 2011, :mod:`raysemiseg.pseudolabel.crf`) where the
  central ``alpha`` fraction of each box's area (a centred rectangle with sides scaled by
  ``sqrt(alpha)``; paper: "the centre area of the box, alpha% of its pixels", alpha = 20%) is clamped
  to the box's class (smallest box first on overlaps), pixels outside every box are clamped to
  background, and the rest of each box is free with a unary giving ``fg_prior`` (default 0.5) to the
  classes of the boxes covering the pixel (shared equally) and the rest to the background. The CRF runs over background + the image's box classes only.

Boxes are ``(class_id, x0, y0, x1, y1)`` in pixel coordinates of the image, x1/y1 exclusive
(the image store's ``boxes`` column); a box covers columns ``round(x0) .. round(x1) - 1`` and rows
``round(y0) .. round(y1) - 1``, clipped to the image.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysemiseg.pseudolabel.crf import CRFParams, dense_crf

__all__ = ["BboxSegParams", "bbox_rect", "bbox_seg", "boxes_array"]


class BboxSegParams(BaseModel):
    """Bbox-Seg parameters.

    Attributes:
        alpha: clamped central fraction of each box's area (paper: 20%).
        fg_prior: unary probability mass of the covering boxes' classes (shared equally) at free
            in-box pixels; the background gets ``1 - fg_prior`` (0.5 with one box = uniform).
        crf: dense-CRF parameters.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.20, gt=0.0, le=1.0)
    fg_prior: float = Field(0.5, gt=0.0, lt=1.0)
    crf: CRFParams = CRFParams()


def boxes_array(boxes: Iterable[Mapping[str, Any] | Sequence[float]] | np.ndarray | None) -> np.ndarray:
    """Boxes as a (B, 5) float64 array ``[class_id, x0, y0, x1, y1]``.

    Accepts the store's list of dicts (keys class_id, x0, y0, x1, y1), a sequence of 5-tuples or an
    array; ``None`` -> (0, 5).

    Raises:
        ValueError: on a malformed box.
    """
    if boxes is None:
        return np.zeros((0, 5))
    rows = []
    for b in boxes if not isinstance(boxes, np.ndarray) else boxes.tolist():
        if isinstance(b, Mapping):
            rows.append([b["class_id"], b["x0"], b["y0"], b["x1"], b["y1"]])
        else:
            if len(b) != 5:
                raise ValueError(f"a box needs 5 values (class_id, x0, y0, x1, y1), got {b!r}")
            rows.append(list(b))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _pixel_rect(box: np.ndarray, h: int, w: int, scale: float = 1.0) -> tuple[int, int, int, int]:
    """Integer (r0, r1, c0, c1) of a box (optionally its centred, side-scaled core), clipped."""
    _, x0, y0, x1, y1 = box
    if scale != 1.0:
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
        x0, x1, y0, y1 = cx - hw, cx + hw, cy - hh, cy + hh
    c0, c1 = int(np.clip(round(x0), 0, w)), int(np.clip(round(x1), 0, w))
    r0, r1 = int(np.clip(round(y0), 0, h)), int(np.clip(round(y1), 0, h))
    return r0, r1, c0, c1


def _paint(boxes: np.ndarray, h: int, w: int, fill: int, scale: float = 1.0) -> np.ndarray:
    """Paint boxes largest-area first so the smallest box wins overlaps."""
    out = np.full((h, w), fill, dtype=np.int64)
    area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    for b in boxes[np.argsort(-area, kind="stable")]:
        r0, r1, c0, c1 = _pixel_rect(b, h, w, scale)
        out[r0:r1, c0:c1] = int(b[0])
    return out


def bbox_rect(boxes: Any, height: int, width: int, background_id: int = 0) -> np.ndarray:
    """Bbox-Rect pseudo label (Papandreou et al. 2015 Sec. 3.3).

    Args:
        boxes: boxes in any form :func:`boxes_array` accepts.
        height, width: image size in pixels.
        background_id: id for pixels outside every box.

    Returns:
        (H, W) int64 label-space ids.
    """
    return _paint(boxes_array(boxes), height, width, background_id)


def bbox_seg(
    image: np.ndarray,
    boxes: Any,
    params: BboxSegParams | None = None,
    background_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Bbox-Seg pseudo label: dense CRF with clamped box centres and background (Sec. 3.3).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: boxes in any form :func:`boxes_array` accepts.
        params: :class:`BboxSegParams` (alpha = 0.2, DeepLab-LargeFOV CRF).
        background_id: label-space id of the background.

    Returns:
        ``(labels, confidence)``: (H, W) int64 label-space ids and (H, W) float32 CRF max marginal
        (1 at clamped pixels).
    """
    params = params or BboxSegParams()
    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    b = boxes_array(boxes)
    if len(b) == 0:
        return np.full((h, w), background_id, np.int64), np.ones((h, w), np.float32)
    ids = np.unique(np.r_[background_id, b[:, 0].astype(np.int64)])
    ids = np.r_[background_id, ids[ids != background_id]]         # row 0 = background
    row = {int(c): i for i, c in enumerate(ids)}
    p = len(ids)
    # unary: uniform over background + the classes of the boxes covering each pixel
    cover = np.zeros((p, h, w), dtype=np.float32)
    for bx in b:
        r0, r1, c0, c1 = _pixel_rect(bx, h, w)
        cover[row[int(bx[0])], r0:r1, c0:c1] = 1.0
    n_cover = cover.sum(axis=0, keepdims=True)
    probs = np.where(n_cover > 0, params.fg_prior * cover / np.maximum(n_cover, 1), 0.0).astype(np.float32)
    probs[0] = np.where(n_cover[0] > 0, 1.0 - params.fg_prior, 1.0)
    # clamps: outside all boxes -> background; box cores -> their class (smallest box wins)
    inside = _paint(b, h, w, fill=-1) >= 0
    core = _paint(b, h, w, fill=-1, scale=float(np.sqrt(params.alpha)))
    clamp = np.full((h, w), -1, dtype=np.int64)
    clamp[~inside] = 0
    has_core = core >= 0
    order = np.argsort(ids)
    clamp[has_core] = order[np.searchsorted(ids[order], core[has_core])]
    q = dense_crf(img, probs, params.crf, clamp=clamp)
    return ids[q.argmax(axis=0)], q.max(axis=0)
