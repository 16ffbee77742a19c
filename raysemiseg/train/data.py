"""Training and validation data: decode/augment -> mixed batches -> :class:`Batch`.

Which store rows train and validate, with which role and pseudo label, is the driver's data plan
(:mod:`raysemiseg.train.plan`); this module holds what runs on the data:

* decode + augment (random scale, random crop padded with ``ignore_index`` / mean colour, random
  horizontal flip) run in Ray Data ``map_batches`` tasks, off the training process, and emit
  fixed-size uint8/int arrays. Weak rows never expose their pixel mask (it is replaced by
  ``ignore_index``), whatever the store holds. Normalisation with the backbone's mean/std happens on
  the worker's device in :func:`collate` (uint8 travels through the object store: 4x smaller than
  float32).

Worker side: :class:`BatchSampler` turns the worker's dataset shards into an endless stream of
mixed mini-batches. With ``data.strong_fraction = f`` every batch of ``B`` rows holds exactly
``k_s = round(f * B)`` strong rows and ``B - k_s`` weak rows (WSSL semi-supervised setting,
Papandreou et al. 2015 Sec. 3.4; dual-branch k strong + k weak, Luo & Yang 2020 Sec. 3), drawn from
two pools that cycle independently: an epoch is one pass over the weak pool, so the (usually
smaller) strong pool is oversampled. Methods never see any of this: they receive a :class:`Batch`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from raysemiseg.data.schema import decode_image, decode_mask
from raysemiseg.methods.base import Batch

#: per-class box bits (Bbox-EM-Fixed's nested-box regions) are rendered up to this many classes
#: (32 bytes per pixel); beyond, only the Bbox-Rect box mask (one label per pixel): O(1) in K
MAX_BOX_BITS_CLASSES = 256
#: pad colour of crops (ImageNet mean, RGB uint8): zero after normalisation
PAD_RGB = (124, 116, 104)


def quiet_ray_data() -> None:
    """No Ray Data progress bars in this process (training logs stay readable)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def strong_rows_per_batch(batch_size: int, strong_fraction: float) -> int:
    """``round(f * B)`` strong rows per batch of ``B`` (half-up), e.g. B=8, f=0.5 -> 4."""
    return int(math.floor(batch_size * strong_fraction + 0.5))


# ----------------------------------------------------------------------------------------------
# Decode + augment (Ray Data map_batches; pure numpy, also used by the plain benchmark loop)
# ----------------------------------------------------------------------------------------------


def _label_dtype(num_classes: int, ignore_index: int) -> type[np.integer]:
    return np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.int32


def _box_pixels(b: dict, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) pixel rectangle of a box dict (rounded, clipped to the image)."""
    x0, y0 = max(int(round(b["x0"])), 0), max(int(round(b["y0"])), 0)
    x1, y1 = min(int(round(b["x1"])), width), min(int(round(b["y1"])), height)
    return y0, y1, x0, x1


def render_boxes(boxes: list[dict] | None, height: int, width: int, ignore_index: int,
                 background: int = 0) -> np.ndarray:
    """Bbox-Rect rendering (Papandreou et al. 2015 Sec. 3.3): class id inside each box, background
    outside; overlapping boxes resolved smallest-on-top. Rows without boxes are all ``ignore_index``.

    Args:
        boxes: dicts with class_id, x0, y0, x1, y1 (pixels, x1/y1 exclusive) or None/empty.

    Returns:
        (height, width) int64 mask.
    """
    if not boxes:
        return np.full((height, width), ignore_index, np.int64)
    out = np.full((height, width), background, np.int64)
    for b in sorted(boxes, key=lambda b: -(b["x1"] - b["x0"]) * (b["y1"] - b["y0"])):
        y0, y1, x0, x1 = _box_pixels(b, height, width)
        out[y0:y1, x0:x1] = b["class_id"]
    return out


def render_box_bits(boxes: list[dict] | None, height: int, width: int, num_classes: int) -> np.ndarray:
    """Per-class box regions, bit-packed (Bbox-EM-Fixed, Papandreou et al. 2015 Sec. 3.3).

    Unlike :func:`render_boxes`, overlapping boxes keep every class: a small box inside a larger one
    leaves the larger box's class set under it.

    Args:
        boxes: dicts with class_id, x0, y0, x1, y1 (pixels, x1/y1 exclusive) or None/empty.
        num_classes: K, the label-space size.

    Returns:
        (ceil(K/8), height, width) uint8: bit ``c % 8`` of byte ``c // 8`` set where the pixel is
        inside a box of class ``c`` (numpy ``packbits(..., bitorder="little")`` layout; unpacked by
        :func:`raysemiseg.methods.wssl.losses.unpack_box_bits`). All zero for rows without boxes.

    Raises:
        ValueError: a box's class_id is outside [0, K).
    """
    out = np.zeros(((num_classes + 7) // 8, height, width), np.uint8)
    for b in boxes or []:
        c = int(b["class_id"])
        if not 0 <= c < num_classes:
            raise ValueError(f"box class_id {c} outside the label space 0..{num_classes - 1}")
        y0, y1, x0, x1 = _box_pixels(b, height, width)
        out[c // 8, y0:y1, x0:x1] |= np.uint8(1 << (c % 8))
    return out


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize (H, W[, 3]) to ``size`` = (h, w); bilinear for images, nearest for label maps."""
    h, w = size
    if arr.ndim == 3:
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))
    mode = "L" if arr.max(initial=0) <= 255 else "I"
    im = Image.fromarray(arr.astype(np.uint8 if mode == "L" else np.int32), mode=mode)
    return np.asarray(im.resize((w, h), Image.NEAREST)).astype(np.int64)


def augment_example(image: np.ndarray, labels: list[np.ndarray], rng: np.random.Generator, *, crop: int,
                    scale_range: tuple[float, float], flip: bool, ignore_index: int
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random scale, random ``crop x crop`` crop (padded), random horizontal flip.

    The same geometric transform applies to the image and every label map.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) int label maps (mask, pseudo, box mask).
        rng: the random generator (scale ~ U(scale_range), crop offset uniform, flip p=0.5).
        crop: output side in pixels; smaller images are padded (image with :data:`PAD_RGB`,
            labels with ``ignore_index``) before cropping, as in DeepLab.

    Returns:
        ((crop, crop, 3) uint8, [(crop, crop) int64 ...]).
    """
    h, w = image.shape[:2]
    s = float(rng.uniform(*scale_range)) if scale_range[0] != scale_range[1] else float(scale_range[0])
    if s != 1.0:
        nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
        image = _resize(image, (nh, nw), nearest=False)
        labels = [_resize(m, (nh, nw), nearest=True) for m in labels]
        h, w = nh, nw
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        padded = np.empty((h + ph, w + pw, 3), np.uint8)
        padded[...] = np.asarray(PAD_RGB, np.uint8)
        padded[:h, :w] = image
        image = padded
        labels = [np.pad(m, ((0, ph), (0, pw)), constant_values=ignore_index) for m in labels]
        h, w = h + ph, w + pw
    y0 = int(rng.integers(0, h - crop + 1))
    x0 = int(rng.integers(0, w - crop + 1))
    image = image[y0:y0 + crop, x0:x0 + crop]
    labels = [m[y0:y0 + crop, x0:x0 + crop] for m in labels]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        labels = [m[:, ::-1] for m in labels]
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in labels]


def augment_batch(batch: pa.Table, *, crop: int, scale_range: tuple[float, float], flip: bool,
                  ignore_index: int, num_classes: int, uses_boxes: bool, seed: int,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Decode and augment store rows into fixed-size arrays (a Ray Data ``map_batches`` UDF).

    Args:
        batch: rows with the image-store columns plus ``role`` (strong|weak) and ``pseudo``
            (label-store PNG or null).
        rng: random generator; default: seeded from ``seed``, the batch's ids and fresh OS
            entropy (augmentation draws differ between visits of the same rows).

    Returns:
        dict of numpy arrays, N = rows: ``image`` (N, crop, crop, 3) uint8; ``mask``, ``pseudo``
        (and ``box_mask`` when ``uses_boxes``) (N, crop, crop) uint8 or int32 with
        ``ignore_index`` void/padding (``mask`` is all void for weak rows, ``box_mask`` for rows
        without boxes); with ``uses_boxes`` and K <= :data:`MAX_BOX_BITS_CLASSES` also ``box_bits``
        (N, ceil(K/8), crop, crop) uint8 per-class box regions (:func:`render_box_bits`, zero on
        padding; beyond that K the E-step's regions come from ``box_mask`` alone); ``valid`` (N, crop,
        crop) bool, False on the crop's padding (the pixels that are not the image's: no E-step
        label, no loss); ``labels`` (N, K) uint8 multi-hot image-level labels (background column
        set when the space has one at id 0): for strong rows the classes of the CROPPED mask (a
        class cropped out is not present), for weak rows the store's whole-image labels; ``is_strong`` (N,) bool; ``image_id`` (N,) str.

    Raises:
        ValueError: a ``strong`` row without a pixel mask (named; never trained as weak silently).
    """
    if rng is None:
        ids_crc = zlib.crc32("".join(batch["image_id"].to_pylist()).encode())
        rng = np.random.default_rng([seed, ids_crc, int.from_bytes(np.random.bytes(4), "little")])
    ldt = _label_dtype(num_classes, ignore_index)
    cols = batch.to_pydict()
    n = batch.num_rows
    out_img = np.empty((n, crop, crop, 3), np.uint8)
    out_mask = np.empty((n, crop, crop), ldt)
    out_pseudo = np.empty((n, crop, crop), ldt)
    out_box = np.empty((n, crop, crop), ldt) if uses_boxes else None
    with_bits = uses_boxes and num_classes <= MAX_BOX_BITS_CLASSES
    out_bits = np.zeros((n, (num_classes + 7) // 8, crop, crop), np.uint8) if with_bits else None
    out_valid = np.empty((n, crop, crop), bool)
    # the valid-pixel map travels as one more label map: ``inside`` on the image, ignore_index on padding
    inside = 0 if ignore_index != 0 else 1
    multi_hot = np.zeros((n, num_classes), np.uint8)
    is_strong = np.zeros(n, bool)
    for i in range(n):
        image = decode_image(cols["image"][i])
        h, w = image.shape[:2]
        strong = cols["role"][i] == "strong"
        if strong and cols["mask"][i] is None:
            raise ValueError(f"row {cols['image_id'][i]}: role 'strong' but the store holds no pixel mask "
                             "(give it role 'weak' in the split file, or add its mask to the store)")
        is_strong[i] = strong
        void = np.full((h, w), ignore_index, np.int64)
        maps = [decode_mask(cols["mask"][i]) if strong else void]
        maps.append(decode_mask(cols["pseudo"][i]) if cols["pseudo"][i] is not None else void)
        n_bits = 0
        if uses_boxes:
            maps.append(render_boxes(cols["boxes"][i], h, w, ignore_index))
            if with_bits:
                planes = render_box_bits(cols["boxes"][i], h, w, num_classes)
                maps.extend(planes)                            # one uint8 label map per byte
                n_bits = len(planes)
        maps.append(np.full((h, w), inside, np.int64))
        for m in maps:
            if m.shape != (h, w):
                raise ValueError(f"row {cols['image_id'][i]}: label map {m.shape} does not match image {(h, w)}")
        image, maps = augment_example(image, maps, rng, crop=crop, scale_range=scale_range, flip=flip,
                                      ignore_index=ignore_index)
        out_img[i] = image
        out_mask[i] = maps[0]
        out_pseudo[i] = maps[1]
        out_valid[i] = maps[-1] == inside
        if out_box is not None:
            out_box[i] = maps[2]
            if out_bits is not None and n_bits:
                # padding was filled with ignore_index like every label map: no box there
                out_bits[i] = np.stack(maps[3:3 + n_bits]).astype(np.uint8) * out_valid[i]
        if strong:
            # a strong row's labels are the classes of its cropped mask: a class cropped out is absent
            present = np.unique(maps[0])
            multi_hot[i] = multi_hot_labels(present[present != ignore_index].tolist(), num_classes)
        else:
            multi_hot[i] = multi_hot_labels(cols["labels"][i], num_classes)
    out = {"image": out_img, "mask": out_mask, "pseudo": out_pseudo, "valid": out_valid, "labels": multi_hot,
           "is_strong": is_strong, "image_id": np.asarray(cols["image_id"], dtype=object)}
    if out_box is not None:
        out["box_mask"] = out_box
    if out_bits is not None:
        out["box_bits"] = out_bits
    return out


# ----------------------------------------------------------------------------------------------
# Worker side: endless pools, fixed strong fraction, collate
# ----------------------------------------------------------------------------------------------


class _Pool:
    """Endless row stream over one dataset shard, re-iterated (reshuffled) at each pass end; with
    ``augment`` (:func:`augment_batch` keyword arguments) the shard yields encoded rows and each fetch is
    decoded and augmented here, with this pool's own seeded generator."""

    def __init__(self, name: str, shard: Any, fetch: int, shuffle_buffer: int, seed: int,
                 augment: dict[str, Any] | None = None) -> None:
        self.name, self.shard, self.fetch, self.shuffle_buffer, self.seed = name, shard, fetch, shuffle_buffer, seed
        self.augment = augment
        self.rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        self.passes = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._buf: list[dict[str, np.ndarray]] = []
        self._buffered = 0

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            rows = 0
            fmt = "numpy" if self.augment is None else "pyarrow"
            for b in self.shard.iter_batches(batch_size=self.fetch, batch_format=fmt, prefetch_batches=2,
                                             local_shuffle_buffer_size=self.shuffle_buffer or None,
                                             local_shuffle_seed=self.seed + self.passes if self.shuffle_buffer else None):
                if self.augment is not None:
                    b = augment_batch(b, **self.augment, rng=self.rng)
                rows += len(b["image_id"])
                yield b
            self.passes += 1
            if rows == 0:
                raise RuntimeError(f"training pool {self.name!r} has no rows on this worker "
                                   "(fewer rows than workers?)")

    def take(self, k: int) -> dict[str, np.ndarray]:
        """The next ``k`` rows (crossing pass boundaries), as a dict of arrays."""
        if self._it is None:
            self._it = self._batches()
        while self._buffered < k:
            b = next(self._it)
            self._buf.append(b)
            self._buffered += len(b["image_id"])
        merged = {key: np.concatenate([b[key] for b in self._buf]) for key in self._buf[0]}
        head = {key: v[:k] for key, v in merged.items()}
        rest = {key: v[k:] for key, v in merged.items()}
        self._buffered -= k
        self._buf = [rest] if self._buffered else []
        return head


class BatchSampler:
    """Mixed mini-batches with a fixed number of strong rows (worker side).

    Args:
        shards: ``{"train": it}`` or ``{"train_strong": it, "train_weak": it}`` (Ray Data
            iterators from ``ray.train.get_dataset_shard``, or any object with ``iter_batches``).
        batch_size: rows per batch ``B``.
        strong_fraction: ``f`` or None (one pool, batches as sampled).
        shuffle_buffer: local shuffle buffer in rows (0 = none).
        seed: shuffle seed (pass ``p`` uses ``seed + p``).
        augment: None when the shards yield augmented rows (Ray Data did it); else the keyword arguments of
            :func:`augment_batch` (``DataPlan.augment``, ``data.augment_in: worker``): the shards yield encoded
            rows and this process decodes and augments each fetch (seeded by ``seed`` and the pool).
    """

    def __init__(self, shards: dict[str, Any], batch_size: int, strong_fraction: float | None,
                 shuffle_buffer: int = 0, seed: int = 0, augment: dict[str, Any] | None = None) -> None:
        self.batch_size = batch_size
        if strong_fraction is None:
            self.quota = {"train": batch_size}
        else:
            k_s = strong_rows_per_batch(batch_size, strong_fraction)
            self.quota = {k: v for k, v in (("train_strong", k_s), ("train_weak", batch_size - k_s)) if v > 0}
        missing = set(self.quota) - set(shards)
        if missing:
            raise ValueError(f"missing dataset shards {sorted(missing)}; have {sorted(shards)}")
        self.pools = {name: _Pool(name, shards[name], k, shuffle_buffer, seed, augment) for name, k in self.quota.items()}

    def next(self) -> dict[str, np.ndarray]:
        """One batch of ``batch_size`` rows (strong rows first), numpy arrays as in :func:`augment_batch`."""
        parts = [self.pools[name].take(k) for name, k in self.quota.items()]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def steps_per_epoch(pool_rows: dict[str, int], batch_size: int, strong_fraction: float | None,
                    num_workers: int) -> int:
    """Steps in one epoch: one pass over the weak pool (or the only pool), per worker.

    Each worker's shard holds ``rows // num_workers`` rows (equal split); the epoch is
    ``ceil(shard_rows / rows_per_batch_from_that_pool)`` and at least 1.
    """
    if strong_fraction is None:
        return max(1, math.ceil((pool_rows["train"] // num_workers) / batch_size))
    k_s = strong_rows_per_batch(batch_size, strong_fraction)
    if batch_size - k_s > 0:
        return max(1, math.ceil((pool_rows["train_weak"] // num_workers) / (batch_size - k_s)))
    return max(1, math.ceil((pool_rows["train_strong"] // num_workers) / k_s))


def collate(rows: dict[str, np.ndarray], mean: Any, std: Any, device: torch.device | str = "cpu") -> Batch:
    """Numpy rows -> :class:`Batch` on ``device``, images normalised ``(x / 255 - mean) / std``.

    Args:
        rows: arrays as returned by :func:`augment_batch` (without ``valid``: ``Batch.valid`` is None,
            every pixel valid).
        mean, std: per-channel RGB statistics of the backbone, values in [0, 1].
    """
    dev = torch.device(device)
    img = torch.from_numpy(rows["image"]).to(dev, non_blocking=True)
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    images = (img.permute(0, 3, 1, 2).float() / 255.0 - m) / s
    box = rows.get("box_mask")
    bits = rows.get("box_bits")
    valid = rows.get("valid")
    return Batch(
        images=images.contiguous(),
        masks=torch.from_numpy(rows["mask"].astype(np.int64)).to(dev),
        pseudo=torch.from_numpy(rows["pseudo"].astype(np.int64)).to(dev),
        image_labels=torch.from_numpy(rows["labels"].astype(np.float32)).to(dev),
        is_strong=torch.from_numpy(rows["is_strong"].astype(bool)).to(dev),
        box_masks=None if box is None else torch.from_numpy(box.astype(np.int64)).to(dev),
        image_ids=[str(i) for i in rows["image_id"]],
        valid=None if valid is None else torch.from_numpy(np.asarray(valid, bool)).to(dev),
        box_bits=None if bits is None else torch.from_numpy(np.asarray(bits, np.uint8)).to(dev),
    )


# ----------------------------------------------------------------------------------------------
# Validation rows (decoded on the worker: native sizes differ per image)
# ----------------------------------------------------------------------------------------------


def prepare_eval_image(image: np.ndarray, val_size: int | None) -> np.ndarray:
    """Resize (H, W, 3) uint8 so its long side is ``val_size`` (unchanged when None)."""
    if val_size is None:
        return image
    h, w = image.shape[:2]
    s = val_size / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return image
    return _resize(image, (max(int(round(h * s)), 1), max(int(round(w * s)), 1)), nearest=False)


def multi_hot_labels(ids: Any, num_classes: int, background_id: int | None = 0) -> np.ndarray:
    """(K,) float32 multi-hot vector of a row's image-level labels.

    Args:
        ids: the store's ``labels`` value (foreground ids, background excluded; None = none).
        num_classes: K, the label-space size.
        background_id: set to 1 as well (background is present in every image); None = no background.

    Ids outside ``[0, K)`` are ignored (the store validates ids when it is built).
    """
    out = np.zeros(num_classes, np.float32)
    out[[c for c in (ids if ids is not None else []) if 0 <= c < num_classes]] = 1
    if background_id is not None:
        out[background_id] = 1
    return out


def iter_val_rows(rows: Any, rank: int = 0, world: int = 1, fetch: int = 8) -> Iterator[dict[str, Any]]:
    """Decoded validation rows ``i`` with ``i % world == rank`` (every row counted exactly once).

    Args:
        rows: a :class:`~raysemiseg.train.plan.ValRows` selection (each worker reads its own
            files when there are enough), a Ray Data iterator/dataset (``iter_batches``) or a
            pyarrow Table of store rows.

    Yields:
        {"image_id": str, "image": (H, W, 3) uint8, "mask": (H, W) int64 or None,
        "labels": list[int] of image-level ids (background excluded) when ``rows`` has a ``labels``
        column, else None}.
    """
    own = False
    if hasattr(rows, "shard"):                       # ValRows: a pyarrow scan of this worker's files
        batches, own = rows.shard(rank, world, batch_rows=fetch)
    elif isinstance(rows, pa.Table):
        batches = rows.to_batches(max_chunksize=fetch)
    else:
        batches = rows.iter_batches(batch_size=fetch, batch_format="pyarrow")
    i = 0
    for b in batches:
        cols = b.to_pydict()
        for j in range(len(cols["image_id"])):
            if own or i % world == rank:
                mask = cols["mask"][j]
                yield {"image_id": cols["image_id"][j], "image": decode_image(cols["image"][j]),
                       "mask": None if mask is None else decode_mask(mask),
                       "labels": cols["labels"][j] if "labels" in cols else None}
            i += 1
