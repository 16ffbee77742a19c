"""Export an image store back to a ``VOCdevkit``-style folder (readable by :mod:`raysemiseg.data.voc`).

Layout written under ``OUT``::

    JPEGImages/<name>.jpg|.png              the stored image bytes, unchanged (PNG stays .png)
    SegmentationClass/<name>.png            palette PNG (mode 'P', the space's palette, index 255
                                            coloured (224, 224, 192)); 16-bit grey for spaces
                                            with more than 255 classes
    ImageSets/Segmentation/<split>.txt      names of the rows with a mask, per store split
    ImageSets/Main/<split>.txt              names of all rows, per store split
    Annotations/<name>.xml                  rows with boxes or image-level labels: one <object>
                                            per box (1-based inclusive bndbox), then one box-less
                                            <object> per label without a box
    label_space.yaml                        the store's label space (so the VOC reader decodes
                                            the ids of any space, not only VOC-21)

``<name>`` is the image id with ``/`` replaced by ``__`` (``coco-mini/000000000790`` ->
``coco-mini__000000000790``).
"""

from __future__ import annotations

import argparse
import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image
from tqdm import tqdm

from raysemiseg.data.schema import decode_mask
from raysemiseg.data.store import ImageStore, open_store
from raysemiseg.data.voc import LABEL_SPACE_FILE, VOID_RGB
from raysemiseg.labels import LabelSpace


def voc_name(image_id: str) -> str:
    """File stem used for ``image_id`` in the exported layout."""
    return image_id.replace("/", "__")


def encode_voc_mask(mask: np.ndarray, space: LabelSpace) -> bytes:
    """(H, W) ids -> palette PNG bytes (8-bit spaces) or 16-bit grey PNG (larger spaces)."""
    buf = io.BytesIO()
    if space.mask_dtype == np.uint8:
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[: space.num_classes] = space.palette
        if space.ignore_index < 256:
            pal[space.ignore_index] = VOID_RGB
        im = Image.fromarray(mask.astype(np.uint8), mode="P")
        im.putpalette(pal.reshape(-1).tolist())
    else:
        im = Image.fromarray(mask.astype(np.uint16))
    im.save(buf, format="PNG")
    return buf.getvalue()


def _xml(name: str, row: dict[str, Any], space: LabelSpace) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = name
    size = ET.SubElement(ann, "size")
    for k in ("width", "height"):
        ET.SubElement(size, k).text = str(row[k])
    ET.SubElement(size, "depth").text = "3"
    boxed = set()
    for b in row["boxes"] or []:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = space.names[b["class_id"]]
        bb = ET.SubElement(obj, "bndbox")
        for k, v in (("xmin", b["x0"] + 1), ("ymin", b["y0"] + 1), ("xmax", b["x1"]), ("ymax", b["y1"])):
            ET.SubElement(bb, k).text = f"{v:g}"
        boxed.add(b["class_id"])
    for c in row["labels"] or []:
        if c not in boxed:
            ET.SubElement(ET.SubElement(ann, "object"), "name").text = space.names[c]
    return ET.tostring(ann)


def export_voc(store: ImageStore | str | Path, out: str | Path, progress: bool = True) -> dict[str, int]:
    """Write the store as a VOCdevkit-style folder.

    Returns:
        ``{"images": n, "masks": m, "annotations": k}``.

    Raises:
        ValueError: ``out`` exists and is not empty.
    """
    st = store if isinstance(store, ImageStore) else open_store(store)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"export folder {out} is not empty; choose a new folder")
    space = st.label_space
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/Main", "Annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / LABEL_SPACE_FILE).write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    seg_lists: dict[str, list[str]] = {}
    main_lists: dict[str, list[str]] = {}
    n = m = k = 0
    bar = tqdm(total=len(st), desc="export-voc", unit="img", disable=not progress)
    for f in st.files:
        for row in pq.read_table(f).to_pylist():
            name = voc_name(row["image_id"])
            ext = "jpg" if row["image_format"] == "jpeg" else "png"
            (out / "JPEGImages" / f"{name}.{ext}").write_bytes(row["image"])
            main_lists.setdefault(row["split"], []).append(name)
            n += 1
            if row["mask"] is not None:
                (out / "SegmentationClass" / f"{name}.png").write_bytes(
                    encode_voc_mask(decode_mask(row["mask"]), space))
                seg_lists.setdefault(row["split"], []).append(name)
                m += 1
            if row["boxes"] or (row["mask"] is None and row["labels"]):
                (out / "Annotations" / f"{name}.xml").write_bytes(_xml(name, row, space))
                k += 1
            bar.update(1)
    bar.close()
    for d, lists in (("Segmentation", seg_lists), ("Main", main_lists)):
        for split, names in lists.items():
            (out / "ImageSets" / d / f"{split}.txt").write_text("\n".join(names) + "\n")
    return {"images": n, "masks": m, "annotations": k}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export-voc`` to the ``data`` sub-commands."""
    p = sub.add_parser("export-voc", help="write a store as a VOCdevkit-style folder")
    p.add_argument("store")
    p.add_argument("out")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    r = export_voc(args.store, args.out)
    print(f"exported {r['images']} images, {r['masks']} masks, {r['annotations']} annotation files to {args.out}")
    return 0
