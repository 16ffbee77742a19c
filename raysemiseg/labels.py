"""Label spaces as data: class ids, names, palette, ignore index, and mappings between spaces.

A :class:`LabelSpace` is the only place that knows how many classes a dataset has. Built-ins:

* ``voc21``: PASCAL VOC 2012, background + 20 classes (ids 0..20), VOC colour palette.
* ``coco80``: the 80 MS-COCO "thing" categories, background at id 0 (ids 0..80), COCO names.
* ``coco60``: background + the 60 COCO categories that are not VOC classes (Hong et al. 2016,
  Xiao et al. 2018 split-set 4 source classes).

A user space comes from YAML::

    names: [background, cat, dog]     # class names in id order (required, unique)
    palette: [[0,0,0],[255,0,0],[0,255,0]]   # optional, one [r, g, b] per class
    ignore_index: 255                 # optional, default 255
    background: background            # optional, the name of the background class

Label spaces with up to 21,841 classes (ImageNet-21k) are supported: nothing here allocates
per-image arrays of the space's size.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The 80 COCO categories in COCO's own category-id order (ids 1..90 with gaps).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# COCO name -> VOC name where they differ (DESIGN.md section 4); 14 more share the name.
COCO_TO_VOC_RENAME: Mapping[str, str] = {
    "airplane": "aeroplane",
    "motorcycle": "motorbike",
    "dining table": "diningtable",
    "potted plant": "pottedplant",
    "couch": "sofa",
    "tv": "tvmonitor",
}


def _voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map, shape (n, 3), dtype uint8."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _generated_palette(n: int) -> np.ndarray:
    """Distinct colours for large spaces: VOC map for the first 256, golden-ratio hues after."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    head = min(n, 256)
    pal[:head] = _voc_palette(256)[:head]
    for i in range(head, n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.45 * ((i * 7919) % 97) / 96.0
        v = 0.6 + 0.4 * ((i * 104729) % 89) / 88.0
        pal[i] = [round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v)]
    return pal


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of class names with ids ``0..num_classes-1``.

    Attributes:
        name: short identifier (``voc21``, ``coco80``, ``coco60`` or the YAML file stem).
        names: class names in id order; unique.
        palette: (num_classes, 3) uint8 RGB colours.
        ignore_index: the "void" id in masks (255 by VOC convention); never a class id, so a
            space with an ignore index of 255 holds at most 255 classes in 8-bit masks; larger
            spaces store masks as 16-bit PNGs (see ``mask_dtype``).
        background: name of the background class, or ``None`` for spaces without one.

    Raises:
        ValueError: on duplicate names, a palette of the wrong shape, an ignore index that
            collides with a class id, or a background name that is not in ``names``.
    """

    name: str
    names: tuple[str, ...]
    palette: np.ndarray = field(repr=False, compare=False)
    ignore_index: int = IGNORE_INDEX
    background: str | None = "background"

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise ValueError(f"label space {self.name!r}: 'names' is empty")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"label space {self.name!r}: duplicate class names {dup}")
        pal = np.asarray(self.palette, dtype=np.uint8)
        if pal.shape != (len(self.names), 3):
            raise ValueError(
                f"label space {self.name!r}: palette has shape {pal.shape}, "
                f"expected ({len(self.names)}, 3)"
            )
        object.__setattr__(self, "palette", pal)
        if 0 <= self.ignore_index < len(self.names):
            raise ValueError(
                f"label space {self.name!r}: ignore_index {self.ignore_index} is also a class id "
                f"(0..{len(self.names) - 1}); pick a value >= {len(self.names)}"
            )
        if self.background is not None and self.background not in self.names:
            raise ValueError(
                f"label space {self.name!r}: background {self.background!r} is not among the names"
            )

    # --- sizes and lookups -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes including background (if the space has one)."""
        return len(self.names)

    @property
    def background_id(self) -> int | None:
        """Id of the background class, or ``None``."""
        return None if self.background is None else self.index(self.background)

    @property
    def foreground_ids(self) -> tuple[int, ...]:
        """All class ids except background, ascending."""
        bg = self.background_id
        return tuple(i for i in range(self.num_classes) if i != bg)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def index(self, name: str) -> int:
        """Id of class ``name``.

        Raises:
            KeyError: naming the unknown class and the space.
        """
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"class {name!r} is not in label space {self.name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def mask_dtype(self) -> type[np.unsignedinteger]:
        """uint8 when every id and the ignore index fit in a byte, else uint16."""
        return np.uint8 if max(self.num_classes - 1, self.ignore_index) <= 255 else np.uint16

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """Return the sorted unique ids in ``ids`` that are neither class ids nor ignore_index."""
        u = np.unique(np.asarray(ids))
        bad = (u < 0) | ((u >= self.num_classes) & (u != self.ignore_index))
        return u[bad]

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Map a (H, W) integer mask to a (H, W, 3) uint8 RGB image; ignore pixels are white."""
        m = np.asarray(mask)
        out = np.full(m.shape + (3,), 255, dtype=np.uint8)
        valid = (m >= 0) & (m < self.num_classes)
        out[valid] = self.palette[m[valid]]
        return out

    # --- mappings ----------------------------------------------------------------------
    def mapping_to(self, target: "LabelSpace", rename: Mapping[str, str] | None = None) -> np.ndarray:
        """Lookup table from this space's ids to ``target``'s ids.

        Classes matched by name (after ``rename``, default COCO->VOC renames, also applied in
        reverse, so VOC's aeroplane finds COCO's airplane); classes without a counterpart map to
        the target's background (or its ignore index when it has none; see
        :meth:`mapping_losses`). The ignore index maps to the target's ignore index.

        Returns:
            (max(num_classes, ignore_index + 1),) int64 array ``lut`` so that
            ``lut[mask]`` converts a mask.
        """
        rename = COCO_TO_VOC_RENAME if rename is None else rename
        fallback = target.background_id if target.background_id is not None else target.ignore_index
        inverse = {v: k for k, v in rename.items()}
        lut = np.full(max(self.num_classes, self.ignore_index + 1), fallback, dtype=np.int64)
        for i, n in enumerate(self.names):
            for cand in (rename.get(n, n), n, inverse.get(n, n)):
                if cand in target:
                    lut[i] = target.index(cand)
                    break
        lut[self.ignore_index] = target.ignore_index
        return lut

    def mapping_losses(self, target: "LabelSpace", rename: Mapping[str, str] | None = None
                       ) -> dict[int, str]:
        """The classes of this space that :meth:`mapping_to` ``target`` does not carry over.

        A class is lost when it is not this space's background and lands on ``target``'s
        background (``"background"``: merged into it), or when it lands on ``target``'s ignore
        index (``"void"``: its labelled pixels become void; this includes this space's background
        when ``target`` has none). This space's background -> ``target``'s background and the
        ignore index -> ignore are not losses.

        Args:
            target: the space masks are mapped into.
            rename: as in :meth:`mapping_to` (default the COCO -> VOC renames).

        Returns:
            ``{class id of this space: "background" | "void"}``, ascending ids; empty when the
            mapping keeps every class.
        """
        lut = self.mapping_to(target, rename)
        bg, tbg = self.background_id, target.background_id
        out: dict[int, str] = {}
        for i in range(self.num_classes):
            j = int(lut[i])
            if j == target.ignore_index:
                out[i] = "void"
            elif tbg is not None and j == tbg and i != bg:
                out[i] = "background"
        return out

    def to_dict(self) -> dict:
        """YAML-ready dict (the same fields :func:`load_label_space` reads)."""
        return {
            "names": list(self.names),
            "palette": self.palette.tolist(),
            "ignore_index": self.ignore_index,
            "background": self.background,
        }


def _make(name: str, names: Sequence[str], background: str | None = "background") -> LabelSpace:
    return LabelSpace(name=name, names=tuple(names), palette=_generated_palette(len(names)),
                      background=background)


def _coco60_names() -> tuple[str, ...]:
    voc = set(VOC_CLASSES)
    return tuple(n for n in COCO_CLASSES if COCO_TO_VOC_RENAME.get(n, n) not in voc)


@functools.lru_cache(maxsize=None)
def builtin(name: str) -> LabelSpace:
    """One of the built-in label spaces: ``voc21``, ``coco80``, ``coco60``.

    Raises:
        KeyError: for any other name, listing the valid ones.
    """
    if name == "voc21":
        return LabelSpace("voc21", VOC_CLASSES, _voc_palette(len(VOC_CLASSES)))
    if name == "coco80":
        return _make("coco80", ("background",) + COCO_CLASSES)
    if name == "coco60":
        return _make("coco60", ("background",) + _coco60_names())
    raise KeyError(f"unknown built-in label space {name!r}; valid: {sorted(BUILTIN_NAMES)}")


BUILTIN_NAMES = ("voc21", "coco80", "coco60")


def load_label_space(spec: str | Path) -> LabelSpace:
    """A built-in name (``voc21|coco80|coco60``) or the path of a YAML label-space file.

    Raises:
        FileNotFoundError: the path does not exist (and is not a built-in name).
        ValueError: the YAML lacks ``names`` or has unknown keys or bad values; names the file.
    """
    s = str(spec)
    if s in BUILTIN_NAMES:
        return builtin(s)
    path = Path(s)
    if not path.is_file():
        raise FileNotFoundError(
            f"label space {s!r} is neither a built-in ({', '.join(BUILTIN_NAMES)}) nor a file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a label-space file must be a mapping with a 'names:' list")
    allowed = {"names", "palette", "ignore_index", "background"}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    names = data.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'names' must be a list of class-name strings")
    palette = data.get("palette")
    pal = _generated_palette(len(names)) if palette is None else np.asarray(palette)
    try:
        return LabelSpace(
            name=path.stem,
            names=tuple(names),
            palette=pal,
            ignore_index=int(data.get("ignore_index", IGNORE_INDEX)),
            background=data.get("background"),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
