"""Combinatorial cropping (Hong, Noh & Han, DecoupledNet, NeurIPS 2015, Sec. 5): data
augmentation for training the figure-ground segmentation network from few strong images.

For an image with foreground label set L, every non-empty subset S of L (2^|L| - 1 of them) gives
one binary mask (foreground = pixels of any class in S, background = every other labelled pixel,
void kept as ``ignore_index``) and ``num_crops`` (N_p) crops that enclose that mask. The paper
takes the crops from region proposals (EdgeBoxes); here they are sampled at random: each side of the
crop is drawn uniformly between the image border and the tight bounding box of the subset's mask,
so every crop contains the whole mask (a crop of an empty mask is drawn in the whole image).

Images with more than ``max_labels`` labels would explode (2^|L|); they get the |L| singletons and
the full set only (a documented cap, 8 labels = 255 subsets by default).

Two entry points:

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
    """Combinatorial cropping of one image (DecoupledNet Sec. 5).

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
