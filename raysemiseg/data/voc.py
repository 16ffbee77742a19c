"""PASCAL VOC 2012 ``VOCdevkit`` layout (and SBD ``SegmentationClassAug``) -> store records.

Expected folder (a ``VOC2012``-style root)::

    ROOT/JPEGImages/<name>.jpg            (``.png`` accepted too: exported PNG images)
    ROOT/SegmentationClass/<name>.png     palette ('P') PNGs; pixel = palette index = class id,
                                          255 = void (kept as the ignore index)
    ROOT/SegmentationClassAug/<name>.png  SBD masks (used instead when present, or by option)
    ROOT/ImageSets/Segmentation/<list>.txt one name per line (or "/JPEGImages/x.jpg /Seg.../x.png")
    ROOT/Annotations/<name>.xml           optional: object names and 1-based inclusive boxes
    ROOT/label_space.yaml                 optional: the space of the mask ids (written by the
                                          exporter); without it the masks are VOC-21 ids

Mask decoding: mode 'P' and 'L' PNGs are read by index (the palette colours are *not*
used, as in the VOC devkit); 16-bit PNGs likewise; RGB masks are mapped colour -> id through the
mask space's palette ((224, 224, 192) = void). Ids are validated against the mask space (an id
like 37 in a 21-class mask quarantines the row), then mapped by name into the target space
(``LabelSpace.mapping_to``; names not in the target become its background).

Each list file becomes one split named after it (``train``, ``val``, ``train_aug``...);
``trainval`` is skipped by default when ``train`` and ``val`` exist. An image in two lists is
listed twice and the store keeps its first occurrence (the second is quarantined as a duplicate).
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from raysemiseg.data.validate import RowError, check_mask, read_bytes
from raysemiseg.labels import COCO_TO_VOC_RENAME, LabelSpace, builtin, load_label_space

VOID_RGB = (224, 224, 192)
LABEL_SPACE_FILE = "label_space.yaml"


def voc_lists(root: Path, lists: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """``[(split_name, list_path), ...]`` to read, in a fixed order.

    Raises:
        FileNotFoundError: no list folder / a named list does not exist (names what is missing).
    """
    seg = root / "ImageSets" / "Segmentation"
    if lists:
        out = []
        for name in lists:
            p = Path(name) if name.endswith(".txt") and Path(name).is_file() else seg / f"{name}.txt"
            if not p.is_file():
                raise FileNotFoundError(f"VOC list {p} not found; available: "
                                        f"{sorted(q.stem for q in seg.glob('*.txt'))}")
            out.append((p.stem, p))
        return out
    if not seg.is_dir():
        raise FileNotFoundError(f"{seg} not found: a VOC root needs ImageSets/Segmentation/*.txt lists")
    found = {p.stem: p for p in sorted(seg.glob("*.txt"))}
    if "train" in found and "val" in found:
        found.pop("trainval", None)
    order = ["train", "val", "train_aug", "trainval", "test"]
    names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
    return [(n, found[n]) for n in names]


def mask_space_of(root: Path) -> LabelSpace:
    """The space of the mask ids: ``ROOT/label_space.yaml`` if present, else VOC-21."""
    f = root / LABEL_SPACE_FILE
    return load_label_space(f) if f.is_file() else builtin("voc21")


def read_voc_records(root: str | Path, space: LabelSpace, lists: Sequence[str] | None = None,
                     mask_dir: str | None = None) -> list[dict[str, Any]]:
    """One build record per listed image (list order within each list).

    Args:
        root: the VOC2012-style folder.
        space: the target label space.
        lists: list names under ``ImageSets/Segmentation`` (or ``.txt`` paths); default all.
        mask_dir: ``SegmentationClass`` or ``SegmentationClassAug``; default the Aug folder when
            it exists.

    Raises:
        FileNotFoundError: ``root`` has no ``JPEGImages/`` or no lists.
    """
    root = Path(root)
    if not (root / "JPEGImages").is_dir():
        raise FileNotFoundError(f"{root}/JPEGImages not found; --voc must point at a VOC2012-style folder "
                                f"holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
    if mask_dir is None:
        mask_dir = "SegmentationClassAug" if (root / "SegmentationClassAug").is_dir() else "SegmentationClass"
    mspace = mask_space_of(root)
    mspace_d = {"name": mspace.name, **mspace.to_dict()}
    out = []
    for split, path in voc_lists(root, lists):
        for line in path.read_text().splitlines():
            tok = line.strip().split()
            if not tok:
                continue
            name = Path(tok[0]).stem
            img = root / "JPEGImages" / f"{name}.jpg"
            if not img.exists() and (root / "JPEGImages" / f"{name}.png").exists():
                img = root / "JPEGImages" / f"{name}.png"
            xml = root / "Annotations" / f"{name}.xml"
            out.append({
                "image_id": f"{root.name}/{name}",
                "source": f"voc:{root.name}/{split}",
                "split": split,
                "supervision": "pixel",
                "kind": "voc",
                "image_path": str(img),
                "mask_path": str(root / mask_dir / f"{name}.png"),
                "payload": json.dumps({"mask_space": mspace_d, "xml": str(xml) if xml.is_file() else ""}),
            })
    return out


def decode_voc_mask(data: bytes, mask_space: LabelSpace, path: str | Path = "") -> np.ndarray:
    """Decode VOC mask PNG bytes to (H, W) int64 ids of ``mask_space`` (255 = void kept).

    Raises:
        RowError: "corrupt mask" when the bytes do not decode or an RGB colour is not in the palette.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "L", "I;16", "I", "I;16B"):
                return np.asarray(im).astype(np.int64)
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    except Exception as e:
        raise RowError(f"corrupt mask: {path} cannot be decoded ({type(e).__name__}: {e})", path) from None
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pal = mask_space.palette.astype(np.int64)
    codes = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(pal)}
    codes[(VOID_RGB[0] << 16) | (VOID_RGB[1] << 8) | VOID_RGB[2]] = mask_space.ignore_index
    u, inv = np.unique(key, return_inverse=True)
    unknown = [int(c) for c in u if int(c) not in codes]
    if unknown:
        cols = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:5]]
        raise RowError(f"corrupt mask: {path} holds colours {cols} not in the {mask_space.name!r} palette", path)
    return np.array([codes[int(c)] for c in u], dtype=np.int64)[inv].reshape(key.shape)


def read_voc_xml(path: str | Path, space: LabelSpace) -> list[dict[str, float]]:
    """Boxes of a VOC ``Annotations`` XML in ``space`` (0-based, x1/y1 exclusive).

    Objects whose name (after the COCO->VOC renames) is not in ``space`` are skipped.
    """
    boxes = []
    for obj in ET.parse(path).getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        name = name if name in space else COCO_TO_VOC_RENAME.get(name, name)
        bb = obj.find("bndbox")
        if name not in space or bb is None:
            continue
        x0, y0 = float(bb.findtext("xmin")) - 1, float(bb.findtext("ymin")) - 1
        boxes.append({"class_id": space.index(name), "x0": x0, "y0": y0,
                      "x1": float(bb.findtext("xmax")), "y1": float(bb.findtext("ymax"))})
    return boxes


def voc_row(record: dict[str, Any], height: int, width: int, space: LabelSpace
            ) -> tuple[np.ndarray, list[int], list[dict[str, float]]]:
    """Mask (target ids), image-level labels (classes in the mask) and boxes of one VOC record.

    Raises:
        RowError: missing/corrupt mask, size mismatch, ids outside the mask space.
    """
    p = json.loads(record["payload"])
    d = p["mask_space"]
    mspace = LabelSpace(d["name"], tuple(d["names"]), np.asarray(d["palette"]), int(d["ignore_index"]),
                        d.get("background"))
    mpath = record["mask_path"]
    m = decode_voc_mask(read_bytes(mpath, "mask"), mspace, mpath)
    check_mask(m, height, width, mspace, mpath)
    if mspace.names != space.names or mspace.ignore_index != space.ignore_index:
        m = mspace.mapping_to(space)[m]
    mask = m.astype(space.mask_dtype)
    present = np.unique(mask)
    labels = [int(c) for c in present if c != space.ignore_index and c != space.background_id]
    boxes = read_voc_xml(p["xml"], space) if p.get("xml") else []
    return mask, labels, boxes
