"""Declared, versioned Parquet schemas of the image store, the quarantine table and the label store.

Every stage reads and writes these schemas (pyarrow), so each stage can be rerun alone and its
output inspected with pandas/pyarrow/duckdb. Images and masks are stored as encoded bytes
(JPEG/PNG), never as tensors, so rows stay small and readable by any tool.

Mask encoding: single-channel PNG, mode ``L`` (uint8) when the label space fits in a byte, else
16-bit (``I;16``); pixel value = class id of the store's label space, ``ignore_index`` = void.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

STORE_SCHEMA_VERSION = 1
LABEL_SCHEMA_VERSION = 1

#: supervision values: "pixel" (strong mask), "box" (boxes + image labels), "image" (image labels)
SUPERVISION = ("pixel", "box", "image")

BOX_TYPE = pa.struct([
    ("class_id", pa.int32()),
    ("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
])

#: One row per image. ``boxes`` are in pixel coordinates of the stored image, x1/y1 exclusive.
IMAGE_STORE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),          # unique within the store, e.g. "coco-mini/000000000790"
        ("source", pa.string()),            # reader + dataset, e.g. "coco:instances_train2017"
        ("split", pa.string()),             # "train" | "val" | ... (the source's own split)
        ("supervision", pa.string()),       # one of SUPERVISION (what the source provides)
        ("image", pa.binary()),             # encoded JPEG/PNG bytes
        ("image_format", pa.string()),      # "jpeg" | "png"
        ("mask", pa.binary()),              # encoded PNG (nullable: no pixel labels)
        ("labels", pa.list_(pa.int32())),   # image-level label ids, sorted, background excluded
        ("boxes", pa.list_(BOX_TYPE)),      # may be empty
        ("height", pa.int32()),
        ("width", pa.int32()),
        # nullable JSON: where the row's annotations come from when the source does not say it
        # itself, e.g. {"boxes": "voc-xml"} or {"boxes": "derived-from-mask:cc8,..."} (VOC reader,
        # see raysemiseg/data/voc.py); null = as given by the source. Stores written before this
        # column existed read it as null.
        ("provenance", pa.string()),
    ],
    metadata={b"raysemiseg.schema": b"image_store", b"raysemiseg.version": str(STORE_SCHEMA_VERSION).encode()},
)

#: Rows a reader or stage refused, with the reason. rows read = rows written + rows quarantined.
QUARANTINE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),      # the offending file, when there is one
        ("stage", pa.string()),     # "read", "validate", or a pseudo-label stage name
        ("reason", pa.string()),    # human-readable, names the problem and what to do
    ],
    metadata={b"raysemiseg.schema": b"quarantine", b"raysemiseg.version": b"1"},
)

#: One row per (image, recipe) in a pseudo-label store.
LABEL_STORE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("recipe", pa.string()),
        ("mask", pa.binary()),          # encoded PNG in the image store's label space
        ("confidence", pa.binary()),    # nullable: encoded 8-bit PNG, confidence * 255
        ("provenance", pa.string()),    # JSON: recipe, stage params, checkpoint hash, version
        ("timings", pa.string()),       # JSON: {stage: seconds}
    ],
    metadata={b"raysemiseg.schema": b"label_store", b"raysemiseg.version": str(LABEL_SCHEMA_VERSION).encode()},
)


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode a (H, W) integer mask as PNG bytes (8-bit if max <= 255, else 16-bit).

    Raises:
        ValueError: if ``mask`` is not 2-D or holds values outside 0..65535.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if m.size and (m.min() < 0 or m.max() > 65535):
        raise ValueError(f"mask values must be in 0..65535, got {m.min()}..{m.max()}")
    buf = io.BytesIO()
    if m.size == 0 or m.max() <= 255:
        Image.fromarray(m.astype(np.uint8), mode="L").save(buf, format="PNG")
    else:
        Image.fromarray(m.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Decode PNG bytes written by :func:`encode_mask` to a (H, W) int64 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).astype(np.int64)


def encode_image(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode a (H, W, 3) uint8 RGB array as JPEG or PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(
        buf, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": quality} if fmt == "jpeg" else {})
    )
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes to a (H, W, 3) uint8 RGB array (fully loads: truncation raises)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))
