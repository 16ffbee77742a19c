"""MS-COCO instances JSON -> semantic masks, boxes and image-level labels in a target label space.

Reads a COCO ``instances_*.json`` with pycocotools; several COCO sources can go into one store.

Mapping: each COCO category is matched to the target space by name after the COCO->VOC renames
(``labels.COCO_TO_VOC_RENAME``: airplane=aeroplane, couch=sofa, ...); categories without a
counterpart are *not painted*, so their pixels stay background (or keep the class of an in-space
instance that overlaps them).

Overlap rule (deterministic): crowd regions (``iscrowd: 1``, RLE) are painted first, i.e. lie under
everything; then ordinary instances in order of decreasing annotated ``area`` (ties: ascending
annotation id), so the smaller instance is on top where two instances overlap.

Image-level labels = the target-space ids of all in-space annotations of the image (crowd included),
sorted, background excluded. Boxes = the COCO ``bbox`` ``[x, y, w, h]`` of those annotations as
``(class_id, x0, y0, x1 = x + w, y1 = y + h)`` in pixels, in annotation-id order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysemiseg.data.validate import RowError
from raysemiseg.labels import COCO_TO_VOC_RENAME, LabelSpace


@dataclass(frozen=True)
class CocoSource:
    """One COCO annotation file and its image folder.

    Attributes:
        annotations: path of ``instances_<split>.json``.
        images_dir: folder holding the ``file_name`` of every image.
        name: dataset name used in image ids (the folder above ``annotations/``, e.g. ``coco-mini``).
        split: ``train``/``val``/... from the JSON stem (``instances_val2017`` -> ``val``).
    """

    annotations: Path
    images_dir: Path
    name: str
    split: str


def coco_source(annotations: str | Path, images_dir: str | Path) -> CocoSource:
    """Describe a COCO source; name and split are derived from the paths.

    Raises:
        FileNotFoundError: the JSON file or the image folder does not exist (names it).
    """
    ann, img = Path(annotations), Path(images_dir)
    if not ann.is_file():
        raise FileNotFoundError(f"COCO annotations {ann} not found; pass --coco ANNOTATIONS.json IMAGES_DIR")
    if not img.is_dir():
        raise FileNotFoundError(f"COCO image folder {img} not found; pass --coco ANNOTATIONS.json IMAGES_DIR")
    name = ann.parent.parent.name if ann.parent.name == "annotations" else ann.parent.name
    return CocoSource(ann, img, name or "coco", split_from_stem(ann.stem))


def split_from_stem(stem: str) -> str:
    """``instances_train2017`` -> ``train``; ``instances_val`` -> ``val``; otherwise the stem."""
    s = stem.removeprefix("instances_")
    return s.rstrip("0123456789") or s


def category_lut(categories: list[dict[str, Any]], space: LabelSpace,
                 rename: dict[str, str] | None = None) -> dict[int, int]:
    """COCO category id -> target class id, for the categories that exist in ``space``.

    A COCO name ``n`` matches ``rename.get(n, n)`` if that is in ``space``, else ``n`` itself
    (so ``coco80`` keeps COCO names and ``voc21`` gets the VOC names). The target's background
    class never receives a COCO category.
    """
    rename = dict(COCO_TO_VOC_RENAME if rename is None else rename)
    lut: dict[int, int] = {}
    for c in categories:
        n = c["name"]
        for cand in (rename.get(n, n), n):
            if cand in space and cand != space.background:
                lut[int(c["id"])] = space.index(cand)
                break
    return lut


def read_coco_records(src: CocoSource, space: LabelSpace) -> list[dict[str, Any]]:
    """One build record per image of ``src`` (no pixels are read here), sorted by image id.

    Each record carries the in-space annotations as JSON (``payload``); the rasterisation happens
    later in :func:`coco_row` inside the Ray Data map.
    """
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = COCO(str(src.annotations))
    lut = category_lut(list(coco.cats.values()), space)
    out = []
    json_stem = src.annotations.stem
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        anns = []
        for a in sorted(coco.imgToAnns.get(img_id, []), key=lambda a: a["id"]):
            cid = lut.get(int(a["category_id"]))
            if cid is None:
                continue
            anns.append({
                "id": int(a["id"]), "class_id": cid, "iscrowd": int(a.get("iscrowd", 0)),
                "area": float(a.get("area", 0.0)), "bbox": [float(v) for v in a.get("bbox", [0, 0, 0, 0])],
                "segmentation": a.get("segmentation"),
            })
        stem = Path(info["file_name"]).stem
        out.append({
            "image_id": f"{src.name}/{stem}",
            "source": f"coco:{src.name}/{json_stem}",
            "split": src.split,
            "supervision": "pixel",
            "kind": "coco",
            "image_path": str(src.images_dir / info["file_name"]),
            "mask_path": "",
            "payload": json.dumps({"height": int(info["height"]), "width": int(info["width"]),
                                   "anns": anns}),
        })
    return out


def ann_to_binary(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise one COCO ``segmentation`` (polygons, uncompressed or compressed RLE).

    Returns:
        (height, width) bool array.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported COCO segmentation type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def coco_semantic_mask(anns: list[dict[str, Any]], height: int, width: int, dtype: type = np.uint8) -> np.ndarray:
    """Paint in-space instances into one (height, width) mask (0 = background).

    Args:
        anns: dicts with ``class_id`` (target id), ``iscrowd``, ``area``, ``id``, ``segmentation``.

    Returns:
        (height, width) array of ``dtype``: crowd first, then instances by decreasing area
        (smaller on top); see the module docstring.
    """
    mask = np.zeros((height, width), dtype=dtype)
    order = sorted(anns, key=lambda a: (-int(a["iscrowd"]), -float(a["area"]), int(a["id"])))
    for a in order:
        if a.get("segmentation") is None:
            continue
        mask[ann_to_binary(a["segmentation"], height, width)] = a["class_id"]
    return mask


def coco_row(record: dict[str, Any], height: int, width: int, space: LabelSpace
             ) -> tuple[np.ndarray, list[int], list[dict[str, float]]]:
    """Mask, image-level labels and boxes of one COCO record, for an image of ``height x width``.

    Raises:
        RowError: "size mismatch" when the image is not the size the annotations declare.
    """
    p = json.loads(record["payload"])
    if (p["height"], p["width"]) != (height, width):
        raise RowError(f"size mismatch: image {record['image_path']} is {height}x{width} (HxW) but "
                       f"the COCO annotations declare {p['height']}x{p['width']}", record["image_path"])
    mask = coco_semantic_mask(p["anns"], height, width, space.mask_dtype)
    labels = sorted({int(a["class_id"]) for a in p["anns"]})
    boxes = [{"class_id": int(a["class_id"]), "x0": a["bbox"][0], "y0": a["bbox"][1],
              "x1": a["bbox"][0] + a["bbox"][2], "y1": a["bbox"][1] + a["bbox"][3]} for a in p["anns"]]
    return mask, labels, boxes
