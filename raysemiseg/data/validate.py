"""Row validation shared by every reader: the checks that send a row to quarantine.

A reader turns one source item into a row; any problem with that item raises :class:`RowError`
carrying a human-readable reason. The store builder catches it and writes a quarantine row
(``QUARANTINE_SCHEMA``) instead of an image row, so ``rows read = rows written + rows quarantined``.

Reasons start with a short fixed category followed by ``": "`` and details, e.g.
``"missing file: /data/x.jpg does not exist; ..."``. :func:`reason_category` returns the
category, which the summary counts.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from raysemiseg.labels import LabelSpace

#: the fixed reason categories (the prefix of every quarantine reason)
REASONS = (
    "missing file",
    "corrupt image",
    "corrupt mask",
    "size mismatch",
    "class id outside label space",
    "empty label set",
    "duplicate",
)


class RowError(Exception):
    """A source item that cannot become a store row.

    Args:
        reason: ``"<category>: <details>"``; the category is one of :data:`REASONS`.
        path: the offending file, when there is one.
    """

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = "" if path is None else str(path)


def reason_category(reason: str) -> str:
    """The category of a quarantine reason (the text before the first ``": "``)."""
    return reason.split(": ", 1)[0]


def read_bytes(path: str | Path, what: str = "image") -> bytes:
    """Read a file, mapping a missing file to a :class:`RowError` ("missing file")."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise RowError(f"missing file: {what} {p} does not exist; restore it or drop it from the "
                       f"source's list/annotations", p) from None
    except IsADirectoryError:
        raise RowError(f"missing file: {what} {p} is a directory, not a file", p) from None


def load_image(path: str | Path) -> tuple[bytes, str, int, int, str]:
    """Read and fully decode an image file.

    Returns:
        ``(data, fmt, height, width, sha256)``: the stored bytes (the original file when it is
        JPEG or PNG, else a lossless PNG re-encoding), ``"jpeg"``/``"png"``, size in pixels, and
        the hex SHA-256 of the original file bytes (used to find duplicates across sources).

    Raises:
        RowError: "missing file" or "corrupt image" (truncated or undecodable), naming ``path``.
    """
    raw = read_bytes(path, "image")
    sha = hashlib.sha256(raw).hexdigest()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # full decode: a truncated JPEG raises here
            fmt = (im.format or "").lower()
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise RowError(f"corrupt image: {path} cannot be decoded ({type(e).__name__}: {e}); "
                       f"replace the file", path) from None
    w, h = rgb.size
    if fmt in ("jpeg", "png"):
        return raw, fmt, h, w, sha
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png", h, w, sha


def check_mask(mask: np.ndarray, height: int, width: int, space: LabelSpace, path: str | Path | None,
               what: str = "mask") -> None:
    """Raise :class:`RowError` if ``mask`` (H, W) has the wrong size or ids outside ``space``.

    Valid ids are ``0..space.num_classes-1`` and ``space.ignore_index``.
    """
    if mask.shape != (height, width):
        raise RowError(f"size mismatch: {what} {path or ''} is {mask.shape[0]}x{mask.shape[1]} (HxW) "
                       f"but the image is {height}x{width}", path)
    bad = space.check_ids(mask)
    if bad.size:
        raise RowError(f"class id outside label space: {what} {path or ''} holds ids "
                       f"{bad.tolist()[:10]} not in {space.name!r} (0..{space.num_classes - 1}, "
                       f"ignore {space.ignore_index})", path)
