"""PASCAL VOC 2012 ``VOCdevkit`` layout (and SBD ``SegmentationClassAug``) -> store records.

Expected folder (a ``VOC2012``-style root)::

    ROOT/JPEGImages/<name>.jpg            (``.png`` accepted too: exported PNG images)
    ROOT/SegmentationClass/<name>.png     palette ('P') PNGs; pixel = palette index = class id,
                                          255 = void (kept as the ignore index)
    ROOT/SegmentationClassAug/<name>.png  SBD masks (used instead when present, or by option)
    ROOT/ImageSets/Segmentation/<list>.txt one name per line (or "/JPEGImages/x.jpg /Seg.../x.png")
    ROOT/Annotations/<name>.xml           optional: object names and 1-based inclusive boxes
                                          (without it the image's boxes are derived from its mask)
    ROOT/label_space.yaml                 optional: the space of the mask ids (written by the
                                          exporter); without it (and without ``mask_space``) the
                                          mask ids are read in the target label space

Mask decoding: mode 'P' and 'L' PNGs are read by index (the palette colours are *not*
used, as in the VOC devkit); 16-bit PNGs likewise; RGB masks are mapped colour -> id through the
mask space's palette ((224, 224, 192) = void). Ids are validated against the mask space (an id
like 37 in a 21-class mask quarantines the row), then mapped by name into the target space
(``LabelSpace.mapping_to``).

The mask space is, first to last: the ``mask_space`` argument (``data build --mask-space``), the
folder's ``label_space.yaml``, the target space itself (so a custom dataset's masks built with its
own ``--label-space`` keep their ids; a standard VOC folder built into another space needs
``--mask-space voc21``, and a ``UserWarning`` says so when the target is not VOC-21 and the masks
carry the VOC colour palette). A mapping that would lose classes (``LabelSpace.mapping_losses``: a class
merged into the target's background, or labelled pixels turned void) is checked against the masks
on the driver: if any listed mask holds such a class, listing fails with a ``ValueError`` naming the
classes, unless ``allow_dropped_classes`` (``--allow-dropped-classes``), which keeps the mapping and
records the dropped classes in each row's provenance.

Boxes: an image with ``Annotations/<name>.xml`` gets the XML's boxes (real boxes win). An image
without one gets boxes derived from its mask by :func:`boxes_from_mask` (rule ``DERIVED_BOXES``): one
box per 8-connected component of each non-background class in the target space, void (255) never
part of a component, components smaller than ``MIN_AREA_FRAC`` (0.1 %) of the image dropped except
the largest component of each class. Such boxes approximate instance boxes: touching instances of
one class merge into one box, an instance cut in two by an occluder gives two. The row's
``provenance`` column tells them apart: ``{"boxes": "voc-xml"}`` or ``{"boxes": DERIVED_BOXES}``.

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

#: components below this fraction of the image's H * W pixels are specks (the largest component of
#: each class is kept anyway). 0.1 % is 77 px (about 9 x 9) at the bundled sample's 320 x 240 and
#: 188 px at VOC's 500 x 375: smaller than one output-stride-16 cell, so no network can place such a
#: box, and on the sample about half of all 8-connected class components are 1-7 px slivers cut off
#: by the void border (4224 components for 794 (image, class) pairs; 1465 reach 0.1 %). A fraction,
#: not a pixel count, so the full-size and the resized images get the same boxes up to scale. Keeping
#: each class's largest component (13 of the 794 pairs have no component that large: real small
#: objects, such as a 41 px person) keeps every image-level label backed by at least one box.
MIN_AREA_FRAC = 0.001
DERIVED_BOXES = f"derived-from-mask:cc8,min_area={MIN_AREA_FRAC * 100:g}%HW,largest-per-class-kept"
XML_BOXES = "voc-xml"


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


def mask_space_of(root: Path, target: LabelSpace | None = None,
                  mask_space: LabelSpace | str | Path | None = None) -> LabelSpace:
    """The space of a VOC folder's mask ids.

    Args:
        root: the VOC folder.
        target: the target space of the build (the default mask space); ``None`` = VOC-21.
        mask_space: an explicit space (``LabelSpace``, built-in name or YAML path); wins when given.

    Returns:
        ``mask_space`` if given, else ``ROOT/label_space.yaml`` if present, else ``target``
        (VOC-21 when ``target`` is None).

    Raises:
        FileNotFoundError, ValueError: ``mask_space`` or the folder's YAML does not load.
    """
    if mask_space is not None:
        return mask_space if isinstance(mask_space, LabelSpace) else load_label_space(mask_space)
    f = root / LABEL_SPACE_FILE
    if f.is_file():
        return load_label_space(f)
    return builtin("voc21") if target is None else target


def _same_space(a: LabelSpace, b: LabelSpace) -> bool:
    return a.names == b.names and a.ignore_index == b.ignore_index


def check_mask_mapping(mask_paths: Sequence[str | Path], mask_space: LabelSpace, space: LabelSpace,
                       where: str = "") -> dict[int, int]:
    """Raise if mapping these masks from ``mask_space`` into ``space`` would lose a class they hold.

    Only masks are read when ``mask_space.mapping_losses(space)`` is non-empty (a lossless mapping
    costs nothing). Missing or undecodable masks are skipped here (the build quarantines them).

    Args:
        mask_paths: the mask PNGs to scan.
        mask_space: the space of their ids.
        space: the target space.
        where: the source, for the message.

    Returns:
        ``{lost class id: number of masks holding it}`` (empty when nothing present is lost).

    Raises:
        ValueError: a lost class occurs in a mask; names each class (mask-space name, id, where it
            would go, how many masks hold it, one example file) and the two ways out.
    """
    if _same_space(mask_space, space):
        return {}
    losses = mask_space.mapping_losses(space)
    if not losses:
        return {}
    lost_ids = np.array(sorted(losses), dtype=np.int64)
    found: dict[int, int] = {}
    example: dict[int, str] = {}
    for mp in mask_paths:
        try:
            m = decode_voc_mask(Path(mp).read_bytes(), mask_space, mp)
        except (OSError, RowError):
            continue
        for c in np.intersect1d(np.unique(m), lost_ids):
            found[int(c)] = found.get(int(c), 0) + 1
            example.setdefault(int(c), str(mp))
    if found:
        what = "; ".join(f"{mask_space.names[c]!r} (id {c}) -> {losses[c]}, in {n} masks, e.g. {example[c]}"
                         for c, n in sorted(found.items()))
        raise ValueError(
            f"{where or 'VOC masks'}: mapping the mask ids from label space {mask_space.name!r} into "
            f"{space.name!r} would lose classes present in the masks: {what}. If the masks already hold "
            f"{space.name!r} ids, pass --mask-space {space.name} (or put a label_space.yaml in the folder); "
            f"if those classes should be dropped, pass --allow-dropped-classes")
    return found


def _warn_voc_palette_in_other_space(mask_paths: Sequence[str], space: LabelSpace, root: Path) -> bool:
    """Warn when the default (mask ids read in the target space) may be wrong: palette masks whose
    colours are the PASCAL VOC palette at their ids, built into a space that is not VOC-21. Such
    masks may be VOC-21 masks (then VOC person = 15 would be read as the target's class 15), or a
    custom dataset saved with the VOC colour map (common, and then the default is right); the
    ``UserWarning`` says how the ids are read and how to choose. Returns whether it warned."""
    import warnings

    voc = builtin("voc21")
    if space.names == voc.names:
        return False
    vpal = voc.palette.astype(int)
    for mp in mask_paths:
        try:
            with Image.open(mp) as im:
                if im.mode != "P":
                    continue
                ids = np.unique(np.asarray(im))
                pal = np.asarray(im.getpalette() or [], dtype=int).reshape(-1, 3)
        except Exception:
            continue
        ids = ids[(ids > 0) & (ids < min(voc.num_classes, len(pal)))]
        if ids.size == 0:
            continue
        if not np.array_equal(pal[ids], vpal[ids]):
            return False
        own = [f"{i}={space.names[i]}" for i in ids[ids < space.num_classes][:3]]
        warnings.warn(
            f"VOC folder {root}: {mp} is a palette mask in PASCAL VOC colours (ids {ids.tolist()}); with no "
            f"--mask-space and no {LABEL_SPACE_FILE} its ids are read as {space.name!r} ids ({', '.join(own)}). "
            f"If these are VOC-21 masks, pass --mask-space voc21 to map the VOC classes by name",
            UserWarning, stacklevel=3)
        return True
    return False


def read_voc_records(root: str | Path, space: LabelSpace, lists: Sequence[str] | None = None,
                     mask_dir: str | None = None, mask_space: LabelSpace | str | None = None,
                     allow_dropped_classes: bool = False) -> list[dict[str, Any]]:
    """One build record per listed image (list order within each list).

    Args:
        root: the VOC2012-style folder.
        space: the target label space.
        lists: list names under ``ImageSets/Segmentation`` (or ``.txt`` paths); default all.
        mask_dir: ``SegmentationClass`` or ``SegmentationClassAug``; default the Aug folder when
            it exists.
        mask_space: the space of the mask ids (see :func:`mask_space_of`; default the folder's
            ``label_space.yaml``, else ``space``).
        allow_dropped_classes: map even when classes present in the masks are lost (merged into
            the background or voided); the rows' provenance then names them.

    Raises:
        FileNotFoundError: ``root`` has no ``JPEGImages/`` or no lists.
        ValueError: the mapping loses classes present in the masks (see :func:`check_mask_mapping`).
    """
    root = Path(root)
    if not (root / "JPEGImages").is_dir():
        raise FileNotFoundError(f"{root}/JPEGImages not found; --voc must point at a VOC2012-style folder "
                                f"holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
    if mask_dir is None:
        mask_dir = "SegmentationClassAug" if (root / "SegmentationClassAug").is_dir() else "SegmentationClass"
    mspace = mask_space_of(root, space, mask_space)
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
            boxes_from = XML_BOXES if xml.is_file() else DERIVED_BOXES
            out.append({
                "image_id": f"{root.name}/{name}",
                "source": f"voc:{root.name}/{split}",
                "split": split,
                "supervision": "pixel",
                "kind": "voc",
                "image_path": str(img),
                "mask_path": str(root / mask_dir / f"{name}.png"),
                "payload": json.dumps({"mask_space": mspace_d, "xml": str(xml) if xml.is_file() else ""}),
                "provenance": {"boxes": boxes_from},
            })
    if mask_space is None and not (root / LABEL_SPACE_FILE).is_file():
        _warn_voc_palette_in_other_space([r["mask_path"] for r in out[:8]], space, root)
    mapped = not _same_space(mspace, space)
    dropped: list[str] = []
    if mapped and allow_dropped_classes:  # every class the mapping loses, present in the masks or not
        dropped = [f"{mspace.names[c]}->{how}" for c, how in mspace.mapping_losses(space).items()]
    elif mapped:
        check_mask_mapping([r["mask_path"] for r in out], mspace, space, f"VOC folder {root}")
    for r in out:
        prov = r["provenance"]
        if mapped:
            prov["mask_space"] = mspace.name
        if dropped:
            prov["dropped_classes"] = dropped
        r["provenance"] = json.dumps(prov)
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


def boxes_from_mask(mask: np.ndarray, space: LabelSpace, min_area_frac: float = MIN_AREA_FRAC
                    ) -> list[dict[str, float]]:
    """Boxes derived from a mask: one per 8-connected component of each class (rule ``DERIVED_BOXES``).

    For every class id ``c`` in ``mask`` other than the background and ``space.ignore_index``, the
    pixels ``mask == c`` are split into 8-connected components (``scipy.ndimage.label`` with a 3x3
    structure; void pixels belong to no component and never join two). A component is kept when its
    pixel count is at least ``min_area_frac * H * W``; the largest component of each class is kept
    in any case, so every class present gets a box.

    Args:
        mask: (H, W) integer ids of ``space`` (255/ignore = void).
        space: the mask's label space (its background id is skipped; a space without background
            boxes every class).
        min_area_frac: the speck threshold as a fraction of ``H * W`` (default 0.001).

    Returns:
        Boxes in pixel coordinates, 0-based, ``x1``/``y1`` exclusive (the store convention:
        ``x0 = min column``, ``x1 = max column + 1``), as ``{"class_id", "x0", "y0", "x1", "y1"}``;
        ordered by class id, then by the components' raster order (first pixel, row-major).
    """
    from scipy import ndimage

    m = np.asarray(mask)
    min_px = min_area_frac * m.size
    bg, void = space.background_id, space.ignore_index
    out: list[dict[str, float]] = []
    for c in np.unique(m):
        c = int(c)
        if c == void or c == bg:
            continue
        lab, n = ndimage.label(m == c, structure=np.ones((3, 3), dtype=bool))
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        keep = area >= min_px
        keep[int(np.argmax(area))] = True
        for k, sl in enumerate(ndimage.find_objects(lab)):
            if keep[k]:
                out.append({"class_id": c, "x0": float(sl[1].start), "y0": float(sl[0].start),
                            "x1": float(sl[1].stop), "y1": float(sl[0].stop)})
    return out


def voc_row(record: dict[str, Any], height: int, width: int, space: LabelSpace
            ) -> tuple[np.ndarray, list[int], list[dict[str, float]]]:
    """Mask (target ids), image-level labels (classes in the mask) and boxes of one VOC record.

    Boxes: the record's XML when it has one, else :func:`boxes_from_mask` of the target mask.

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
    boxes = read_voc_xml(p["xml"], space) if p.get("xml") else boxes_from_mask(mask, space)
    return mask, labels, boxes
