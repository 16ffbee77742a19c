"""Combinatorial cropping (Hong, Noh & Han, DecoupledNet, NeurIPS 2015, Sec. 4.4 "Combinatorial
cropping"): data augmentation for training the figure-ground segmentation network from few strong
images.

For an image with foreground label set L, every non-empty subset S of L (2^|L| - 1 of them) gives
one binary mask (foreground = pixels of any class in S, background = every other labelled pixel,
void kept as ``ignore_index``) and ``num_crops`` (N_p) crops that enclose that mask. The paper
takes the crops from region proposals (EdgeBoxes); here they are sampled at random: each side of the
crop is drawn uniformly between the image border and the tight bounding box of the subset's mask,
so every crop contains the whole mask (a crop of an empty mask is drawn in the whole image).

Images with more than ``max_labels`` labels would explode (2^|L|); they get the |L| singletons and
the full set only (a documented cap, 8 labels = 255 subsets by default).

Three entry points:

* :func:`online_combinatorial_crops`: torch, on a training batch. The ``decoupled`` method's
  ``segment`` (and ``default``) stage calls it in every step (``DecoupledParams.combinatorial_crops``
  crops per strong row, on by default): per crop, a subset P drawn uniformly from the
  non-empty subsets of the row's present labels, a random box enclosing the union's foreground,
  the crop resized to the batch size and its target z^P. Over the steps this samples the paper's
  enumeration of every (P, box) without storing 2^|L| * N_p rows.
* :func:`combinatorial_crops`: pure function on arrays (one image).
* :func:`combinatorial_crop_batch`: image-store rows in (Ray Data ``map_batches`` with
  ``batch_format="numpy"``), one row per (subset, crop) out in the same columns, so the result can
  be written as an image store and trained with the ``decoupled`` method's ``segment`` stage (the
  row's labels = the subset, its mask keeps the subset's class ids and sets other classes to
  background). Rows without a mask pass through unchanged.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raysemiseg.data.schema import decode_image, decode_mask, encode_image, encode_mask


@dataclass(frozen=True)
class CropSample:
    """One (subset, crop) training sample.

    Attributes:
        subset: the label ids of S, ascending.
        box: (y0, x0, y1, x1) crop in the source image's pixels, y1/x1 exclusive.
        image: (h, w, 3) uint8 crop.
        mask: (h, w) int64 crop of the class-id mask with classes outside S set to background.
        binary: (h, w) uint8 figure-ground mask: 1 = class in S, 0 = background, ignore_index = void.
    """

    subset: tuple[int, ...]
    box: tuple[int, int, int, int]
    image: np.ndarray
    mask: np.ndarray
    binary: np.ndarray


def label_subsets(labels: Sequence[int], max_labels: int = 8) -> list[tuple[int, ...]]:
    """All non-empty subsets of ``labels`` (2^|L| - 1), smallest first, each ascending.

    With more than ``max_labels`` distinct labels: the singletons and the full set only.

    Raises:
        ValueError: ``labels`` is empty.
    """
    ls = sorted({int(x) for x in labels})
    if not ls:
        raise ValueError("combinatorial cropping needs at least one foreground label")
    if len(ls) > max_labels:
        return [(x,) for x in ls] + [tuple(ls)]
    return [s for r in range(1, len(ls) + 1) for s in itertools.combinations(ls, r)]


def subset_mask(mask: np.ndarray, subset: Sequence[int], background_id: int = 0,
                ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Class-id and binary masks of subset S.

    Args:
        mask: (H, W) integer class ids (``ignore_index`` = void).

    Returns:
        ``(class_mask, binary)``: (H, W) int64 with ids outside S -> ``background_id``; (H, W) uint8
        with 1 on S, 0 elsewhere, ``ignore_index`` on void.
    """
    m = np.asarray(mask).astype(np.int64)
    inside = np.isin(m, np.asarray(subset, dtype=np.int64))
    void = m == ignore_index
    class_mask = np.where(inside | void, m, background_id)
    binary = np.where(void, ignore_index, inside).astype(np.uint8)
    return class_mask, binary


def enclosing_boxes(binary: np.ndarray, num_crops: int, rng: np.random.Generator) -> np.ndarray:
    """``num_crops`` random boxes that each contain every foreground pixel of ``binary``.

    Args:
        binary: (H, W) array; foreground = value 1.
        rng: numpy generator (the caller seeds it).

    Returns:
        (num_crops, 4) int64 boxes (y0, x0, y1, x1), y1/x1 exclusive, with
        0 <= y0 <= top, bottom < y1 <= H (same for x) where top/bottom are the mask's extent.
    """
    h, w = binary.shape
    ys, xs = np.nonzero(binary == 1)
    if ys.size:
        t, b, l, r = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    else:  # empty mask: any box
        t, b, l, r = h // 2, h // 2 + 1, w // 2, w // 2 + 1
    y0 = rng.integers(0, t + 1, num_crops)
    y1 = rng.integers(b, h + 1, num_crops)
    x0 = rng.integers(0, l + 1, num_crops)
    x1 = rng.integers(r, w + 1, num_crops)
    return np.stack([y0, x0, y1, x1], axis=1).astype(np.int64)


def combinatorial_crops(image: np.ndarray, mask: np.ndarray, labels: Sequence[int], num_crops: int,
                        rng: np.random.Generator, background_id: int = 0, ignore_index: int = 255,
                        max_labels: int = 8) -> list[CropSample]:
    """Combinatorial cropping of one image (DecoupledNet Sec. 4.4).

    Args:
        image: (H, W, 3) uint8; mask: (H, W) class ids of the same size.
        labels: the image's foreground label ids (background excluded).
        num_crops: N_p >= 1 crops per subset.

    Returns:
        ``len(label_subsets(labels)) * num_crops`` samples, subset-major.

    Raises:
        ValueError: size mismatch, ``num_crops < 1`` or no labels.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    out: list[CropSample] = []
    for subset in label_subsets(labels, max_labels):
        class_mask, binary = subset_mask(mask, subset, background_id, ignore_index)
        for y0, x0, y1, x1 in enclosing_boxes(binary, num_crops, rng):
            out.append(CropSample(subset, (int(y0), int(x0), int(y1), int(x1)), image[y0:y1, x0:x1],
                                  class_mask[y0:y1, x0:x1], binary[y0:y1, x0:x1]))
    return out


@dataclass(frozen=True)
class CropBatch:
    """Online combinatorial crops of a batch (:func:`online_combinatorial_crops`).

    Attributes:
        images: (Q, C, H, W) float crops, bilinearly resized to the batch's (H, W).
        targets: (Q, H, W) int64 z^P: 1 on pixels of a class in P, 0 on every other labelled pixel,
            ``ignore_index`` on void (nearest-neighbour resized).
        subsets: (Q, K) bool, column c true when class c is in P (label-space ids).
        rows: (Q,) int64 source row of each crop.
        boxes: (Q, 4) int64 (y0, x0, y1, x1) crop boxes in the source row's pixels, y1/x1 exclusive.
    """

    images: Tensor
    targets: Tensor
    subsets: Tensor
    rows: Tensor
    boxes: Tensor


def _expand_box(box: np.ndarray, min_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Grow (y0, x0, y1, x1) symmetrically (inside the image) to at least ``min_size``."""
    y0, x0, y1, x1 = (int(v) for v in box)
    out = []
    for lo, hi, need, lim in ((y0, y1, min_size[0], size[0]), (x0, x1, min_size[1], size[1])):
        grow = max(0, need - (hi - lo))
        lo = max(0, lo - grow // 2)
        hi = min(lim, max(hi, lo + need))
        lo = max(0, min(lo, hi - need))
        out.append((lo, hi))
    return np.array([out[0][0], out[1][0], out[0][1], out[1][1]], dtype=np.int64)


def online_combinatorial_crops(images: Tensor, masks: Tensor, image_labels: Tensor, rows: Tensor,
                               fg_ids: Tensor, num_crops: int, rng: np.random.Generator,
                               ignore_index: int = 255, max_labels: int = 8,
                               min_size_frac: float = 0.25) -> CropBatch:
    """Combinatorial crops of a training batch (DecoupledNet Sec. 4.4), one call per step.

    For each selected row with at least one present foreground label L (``image_labels > 0.5``,
    background column excluded) and each of ``num_crops`` crops: a subset P drawn uniformly from
    :func:`label_subsets` (L), the figure-ground mask z^P (pixels of any class in P = 1, other
    labelled pixels = 0, void kept), a box drawn as in :func:`enclosing_boxes` (each side uniform
    between the image border and the tight box of z^P's foreground; the whole image range when P
    has no pixel in the mask, e.g. a label whose object a random crop removed) and grown to at least
    ``min_size_frac`` of each image side (the paper's EdgeBoxes proposals are object-sized, never a
    few pixels); the crop is resized back to the batch's (H, W).

    Args:
        images: (N, C, H, W) float batch images.
        masks: (N, H, W) int64 class ids (``ignore_index`` = void).
        image_labels: (N, K) float multi-hot labels; the pairs follow these (the loop recomputes a
            strong row's labels after its crop).
        rows: (N,) bool, the rows that give crops (strong rows).
        fg_ids: (K',) int64 foreground class ids.
        num_crops: crops per row (>= 1).
        rng: numpy generator (the caller seeds it; the method draws its seed from torch's RNG).
        min_size_frac: minimum crop side as a fraction of the image side, in (0, 1].

    Returns:
        A :class:`CropBatch` with Q = num_crops * (number of rows with a label); Q may be 0.

    Raises:
        ValueError: ``num_crops < 1``, ``min_size_frac`` outside (0, 1], or mismatched sizes.
    """
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    if not 0.0 < min_size_frac <= 1.0:
        raise ValueError(f"min_size_frac must be in (0, 1], got {min_size_frac}")
    n, _, h, w = images.shape
    if masks.shape != (n, h, w):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    min_size = (max(1, int(round(min_size_frac * h))), max(1, int(round(min_size_frac * w))))
    present = (image_labels[:, fg_ids] > 0.5) & rows[:, None]
    masks_np = masks.detach().cpu().numpy()
    present_np = present.cpu().numpy()
    fg_np = fg_ids.cpu().numpy()
    crops, targets, subsets, src, boxes = [], [], [], [], []
    k = image_labels.shape[1]
    for r in range(n):
        labels = fg_np[present_np[r]].tolist()
        if not labels:
            continue
        options = label_subsets(labels, max_labels)
        for _ in range(num_crops):
            subset = options[int(rng.integers(len(options)))]
            _, binary = subset_mask(masks_np[r], subset, 0, ignore_index)
            box = _expand_box(enclosing_boxes(binary, 1, rng)[0], min_size, (h, w))
            y0, x0, y1, x1 = (int(v) for v in box)
            crops.append(F.interpolate(images[r:r + 1, :, y0:y1, x0:x1], size=(h, w), mode="bilinear",
                                       align_corners=False))
            t = torch.from_numpy(binary[y0:y1, x0:x1].astype(np.int64)).to(masks.device)
            targets.append(F.interpolate(t[None, None].float(), size=(h, w), mode="nearest")[0, 0].long())
            sub = torch.zeros(k, dtype=torch.bool, device=images.device)
            sub[list(subset)] = True
            subsets.append(sub)
            src.append(r)
            boxes.append(box)
    if not crops:
        return CropBatch(images.new_zeros(0, images.shape[1], h, w), masks.new_zeros(0, h, w),
                         torch.zeros(0, k, dtype=torch.bool, device=images.device),
                         torch.zeros(0, dtype=torch.long, device=images.device),
                         torch.zeros(0, 4, dtype=torch.long))
    return CropBatch(torch.cat(crops), torch.stack(targets), torch.stack(subsets),
                     torch.tensor(src, dtype=torch.long, device=images.device),
                     torch.from_numpy(np.stack(boxes)))


def _has_bytes(x: Any) -> bool:
    """True for non-empty encoded bytes (Arrow nulls reach numpy batches as None or NaN)."""
    return isinstance(x, (bytes, bytearray, memoryview, np.bytes_)) and len(x) > 0


def _row_rng(image_id: str, seed: int) -> np.random.Generator:
    """A generator that depends only on (image_id, seed): reruns give the same crops."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def combinatorial_crop_batch(batch: dict[str, Any], num_crops: int = 4, seed: int = 0, background_id: int = 0,
                             ignore_index: int = 255, max_labels: int = 8) -> dict[str, np.ndarray]:
    """Ray Data batch function over image-store rows (``IMAGE_STORE_SCHEMA`` columns).

    Each row with a mask becomes ``(2^|L| - 1) * num_crops`` rows: ``image_id`` =
    ``"<id>#crop-<a+b>-<k>"``, ``image`` (same format as the source), ``mask``, ``labels`` = the
    subset, ``boxes`` = [], ``height``/``width`` of the crop; other columns copied. Rows without
    a mask or without labels pass through unchanged. Deterministic given ``seed``.

    Raises:
        ValueError: a row whose image and mask differ in size (naming the image_id).
    """
    cols = list(batch.keys())
    out: dict[str, list[Any]] = {c: [] for c in cols}
    n = len(batch["image_id"])
    for i in range(n):
        row = {c: batch[c][i] for c in cols}
        labels = [int(x) for x in (row.get("labels") if row.get("labels") is not None else [])]
        if not _has_bytes(row.get("mask")) or not labels:
            for c in cols:
                out[c].append(row[c])
            continue
        image_id = str(row["image_id"])
        fmt = str(row.get("image_format") or "jpeg")
        try:
            samples = combinatorial_crops(decode_image(bytes(row["image"])), decode_mask(bytes(row["mask"])), labels,
                                          num_crops, _row_rng(image_id, seed), background_id, ignore_index, max_labels)
        except ValueError as e:
            raise ValueError(f"combinatorial cropping of {image_id!r}: {e}") from None
        for k, s in enumerate(samples):
            new = dict(row)
            new["image_id"] = f"{image_id}#crop-{'+'.join(map(str, s.subset))}-{k % num_crops}"
            new["image"] = encode_image(s.image, fmt)
            new["mask"] = encode_mask(s.mask)
            new["labels"] = np.asarray(s.subset, dtype=np.int32)
            if "boxes" in new:
                new["boxes"] = []
            new["height"], new["width"] = s.image.shape[0], s.image.shape[1]
            for c in cols:
                out[c].append(new[c])
    result: dict[str, np.ndarray] = {}
    for c, vals in out.items():
        arr = np.empty(len(vals), dtype=object)
        arr[:] = vals
        result[c] = arr
    return result
