"""Image-level-labelled images (the form weak labels take at ImageNet scale) -> store records.

Two layouts, both giving rows with ``supervision = "image"`` and no mask:

* ``ROOT/<class_name>/*.{jpg,jpeg,png}`` (ImageNet style): the folder name is the one label;
  a folder whose name is not in the label space is an error naming the folder.
* a CSV file (or ``ROOT/labels.csv``) with a header ``image,labels``: ``image`` is a path
  relative to the CSV's folder, ``labels`` holds class names separated by ``;`` or ``|``
  (names after the COCO->VOC renames). A name not in the space, or an empty label set,
  quarantines that row.

Image ids: ``<root name>/<relative path without extension>``; split: ``train`` unless given.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from raysemiseg.data.validate import RowError
from raysemiseg.labels import COCO_TO_VOC_RENAME, LabelSpace

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _class_id(name: str, space: LabelSpace) -> int | None:
    for cand in (name, COCO_TO_VOC_RENAME.get(name, name)):
        if cand in space:
            return space.index(cand)
    return None


def read_folder_records(path: str | Path, space: LabelSpace, split: str = "train") -> list[dict[str, Any]]:
    """One build record per image of a class-folder tree or a labels CSV.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a class folder is not in ``space``, or the CSV lacks ``image,labels`` columns.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--folders {path} does not exist")
    if path.is_dir() and (path / "labels.csv").is_file():
        path = path / "labels.csv"
    if path.is_file():
        return _csv_records(path, space, split)
    root = path
    out = []
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        cid = _class_id(cdir.name, space)
        if cid is None:
            raise ValueError(f"folder {cdir}: class {cdir.name!r} is not in label space {space.name!r}; "
                             f"rename the folder to one of its class names or pass another --label-space")
        for img in sorted(p for p in cdir.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            rel = img.relative_to(root).with_suffix("")
            out.append(_record(root.name, rel.as_posix(), img, split, [cid], []))
    return out


def _csv_records(csv_path: Path, space: LabelSpace, split: str) -> list[dict[str, Any]]:
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: a labels CSV needs a header with columns 'image,labels' "
                             f"(got {reader.fieldnames})")
        rows = list(reader)
    base = csv_path.parent
    out = []
    for r in rows:
        names = [n.strip() for n in re.split(r"[;|]", r["labels"] or "") if n.strip()]
        ids = [_class_id(n, space) for n in names]
        unknown = [n for n, i in zip(names, ids) if i is None]
        rel = Path(r["image"])
        out.append(_record(base.name, rel.with_suffix("").as_posix(), base / rel, split,
                           sorted({i for i in ids if i is not None}), unknown))
    return out


def _record(root_name: str, rel: str, img: Path, split: str, labels: list[int], unknown: list[str]) -> dict[str, Any]:
    return {
        "image_id": f"{root_name}/{rel}",
        "source": f"folders:{root_name}",
        "split": split,
        "supervision": "image",
        "kind": "folders",
        "image_path": str(img),
        "mask_path": "",
        "payload": json.dumps({"labels": labels, "unknown": unknown}),
    }


def folder_row(record: dict[str, Any], height: int, width: int, space: LabelSpace
               ) -> tuple[None, list[int], list[dict[str, float]]]:
    """No mask, the image-level labels, no boxes.

    Raises:
        RowError: "class id outside label space" for a label name the space lacks.
    """
    p = json.loads(record["payload"])
    if p["unknown"]:
        raise RowError(f"class id outside label space: labels {p['unknown']} of {record['image_path']} "
                       f"are not in {space.name!r}", record["image_path"])
    return None, [int(i) for i in np.unique(np.asarray(p["labels"], dtype=np.int64))], []
