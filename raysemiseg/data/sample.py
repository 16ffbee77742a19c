"""The bundled real samples: 318 MS-COCO images (coco-mini + coco-tiny, COCO format) and 476 PASCAL
VOC 2012 images (``voc2012-sample``, VOC2012 folder layout), all resized.

``make_sample`` builds ``raysemiseg/sample_data/`` from ``../shared/data`` (run once by a maintainer,
the result is committed); ``sample_sources`` points the readers at it, so the quickstart and the
tests need nothing outside the project.

What ``make_sample`` does, per dataset (``coco-mini``, ``coco-tiny``) and split (train/val 2017):

* images resized so the long side is at most ``max_side`` px (bicubic; aspect kept, each side
  rounded), saved as JPEG (``quality``), same file names;
* polygons and boxes scaled by ``(sx, sy) = (new_w / w, new_h / h)``, areas by ``sx * sy``;
* crowd RLE decoded with pycocotools, resized nearest-neighbour, re-encoded as compressed RLE
  (area and bbox recomputed from the new mask);
* everything else in the JSON (licences, categories, urls) kept unchanged.

The two datasets share one image (id 435206, identical bytes); both copies are kept, as in the
source, and the store builder quarantines the second as a duplicate.

``make_voc_sample`` builds ``voc2012-sample/`` from ``../shared/data/voc2012-476`` (all 476 images,
``train.txt`` 326 / ``val.txt`` 150 copied byte for byte): images resized so the long side is at most
``max_side`` px (bilinear, which PIL antialiases when shrinking; aspect kept, sides rounded), JPEG
``quality`` 90; ``SegmentationClass`` masks resized to the same size with NEAREST (no new ids are
invented) and saved as palette ('P') PNGs with the source palette. ``voc_sample_dir`` returns the folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
DATASETS = ("coco-mini", "coco-tiny")
SPLITS = ("train2017", "val2017")
VOC_SAMPLE = "voc2012-sample"
VOC_SOURCE = "voc2012-476"
VOC_LISTS = ("train", "val")


def voc_sample_dir(root: str | Path | None = None) -> Path:
    """The bundled VOC 2012 sample folder (``raysemiseg/sample_data/voc2012-sample``).

    It is a VOC2012-style root (``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` palette masks with
    VOC-21 ids and 255 void, ``ImageSets/Segmentation/train.txt`` (326) and ``val.txt`` (150)), so
    ``raysemiseg data build --voc <it> --label-space voc21`` reads it (boxes derived from the masks:
    the sample has no ``Annotations/`` XML).

    Args:
        root: the ``sample_data`` folder to look in (default: the package's own).

    Returns:
        The folder's path.

    Raises:
        FileNotFoundError: the folder, its images, masks or lists are missing (run
            ``raysemiseg data make-sample``).
    """
    d = (SAMPLE_DIR if root is None else Path(root)) / VOC_SAMPLE
    need = [d / "JPEGImages", d / "SegmentationClass"] + [
        d / "ImageSets" / "Segmentation" / f"{n}.txt" for n in VOC_LISTS]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise FileNotFoundError(f"bundled VOC sample incomplete: {', '.join(missing)} missing; "
                                f"run `raysemiseg data make-sample --shared ../shared/data` (or `make sample`)")
    return d


def sample_sources(root: str | Path | None = None) -> list[tuple[Path, Path]]:
    """The bundled sample as COCO sources: ``[(annotations_json, images_dir), ...]``.

    Order: coco-mini train, coco-mini val, coco-tiny train, coco-tiny val.

    Raises:
        FileNotFoundError: the sample folder is incomplete (run ``raysemiseg data make-sample``).
    """
    base = SAMPLE_DIR if root is None else Path(root)
    out = []
    for ds in DATASETS:
        for sp in SPLITS:
            ann, img = base / ds / "annotations" / f"instances_{sp}.json", base / ds / sp
            if not ann.is_file() or not img.is_dir():
                raise FileNotFoundError(f"bundled sample incomplete: {ann} or {img} missing; "
                                        f"run `raysemiseg data make-sample`")
            out.append((ann, img))
    return out


def _scale_polygons(seg: list[list[float]], sx: float, sy: float) -> list[list[float]]:
    return [[round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in seg]


def _resize_rle(seg: dict[str, Any], h: int, w: int, nh: int, nw: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    m = mask_utils.decode(rle)
    small = np.asarray(Image.fromarray(m * 255).resize((nw, nh), Image.NEAREST)) > 0
    enc = mask_utils.encode(np.asfortranarray(small.astype(np.uint8)))
    return {"size": [nh, nw], "counts": enc["counts"].decode("ascii")}


def rescale_annotations(data: dict[str, Any], sizes: dict[int, tuple[int, int, int, int]]) -> dict[str, Any]:
    """Rescale a COCO instances dict to new image sizes.

    Args:
        data: the parsed JSON (not modified).
        sizes: image id -> ``(h, w, new_h, new_w)``.

    Returns:
        A new dict with images, polygons, bboxes, areas and crowd RLE in the new pixel grid.
    """
    from pycocotools import mask as mask_utils

    out = dict(data)
    out["images"] = []
    for im in data["images"]:
        h, w, nh, nw = sizes[im["id"]]
        out["images"].append({**im, "height": nh, "width": nw})
    anns = []
    for a in data["annotations"]:
        h, w, nh, nw = sizes[a["image_id"]]
        sx, sy = nw / w, nh / h
        a2 = dict(a)
        seg = a["segmentation"]
        if isinstance(seg, list):
            a2["segmentation"] = _scale_polygons(seg, sx, sy)
            a2["area"] = round(float(a["area"]) * sx * sy, 2)
            x, y, bw, bh = a["bbox"]
            a2["bbox"] = [round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2)]
        else:
            rle = _resize_rle(seg, h, w, nh, nw)
            a2["segmentation"] = rle
            a2["area"] = float(mask_utils.area({**rle, "counts": rle["counts"].encode("ascii")}))
            a2["bbox"] = [float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode("ascii")})]
        anns.append(a2)
    out["annotations"] = anns
    return out


def new_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the long side at most ``max_side`` (unchanged if already smaller)."""
    s = min(1.0, max_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def make_sample(shared: str | Path, out: str | Path | None = None, max_side: int = 320,
                quality: int = 88) -> dict[str, int]:
    """Build the bundled sample from ``shared`` (the ``../shared/data`` folder).

    Returns:
        ``{"images": n, "annotations": m, "bytes": total_size}``.

    Raises:
        FileNotFoundError: ``shared`` lacks ``coco-mini``/``coco-tiny``.
    """
    shared = Path(shared)
    out = SAMPLE_DIR if out is None else Path(out)
    n_img = n_ann = 0
    jobs = [(ds, sp) for ds in DATASETS for sp in SPLITS]
    for ds, sp in jobs:
        ann_path = shared / ds / "annotations" / f"instances_{sp}.json"
        if not ann_path.is_file():
            raise FileNotFoundError(f"{ann_path} not found; --shared must point at the shared data "
                                    f"folder holding {', '.join(DATASETS)}")
    for ds, sp in jobs:
        data = json.loads((shared / ds / "annotations" / f"instances_{sp}.json").read_text())
        (out / ds / "annotations").mkdir(parents=True, exist_ok=True)
        (out / ds / sp).mkdir(parents=True, exist_ok=True)
        sizes = {}
        for im in tqdm(data["images"], desc=f"{ds}/{sp}", unit="img"):
            src = shared / ds / sp / im["file_name"]
            with Image.open(src) as pil:
                rgb = pil.convert("RGB")
            w, h = rgb.size
            if (h, w) != (im["height"], im["width"]):
                raise ValueError(f"{src}: image is {h}x{w} but the JSON says {im['height']}x{im['width']}")
            nh, nw = new_size(h, w, max_side)
            if (nh, nw) != (h, w):
                rgb = rgb.resize((nw, nh), Image.BICUBIC)
            rgb.save(out / ds / sp / im["file_name"], format="JPEG", quality=quality, optimize=True)
            sizes[im["id"]] = (h, w, nh, nw)
        small = rescale_annotations(data, sizes)
        (out / ds / "annotations" / f"instances_{sp}.json").write_text(
            json.dumps(small, separators=(",", ":")))
        n_img += len(small["images"])
        n_ann += len(small["annotations"])
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"images": n_img, "annotations": n_ann, "bytes": total}


def make_voc_sample(src: str | Path, out: str | Path, max_side: int = 320, quality: int = 90
                    ) -> dict[str, int]:
    """Build the VOC sample folder ``out`` from the VOC2012-style folder ``src`` (``voc2012-476``).

    Every image named in ``ImageSets/Segmentation/{train,val}.txt`` is written (lists copied
    unchanged). Image: RGB, long side <= ``max_side`` (``new_size``), ``Image.BILINEAR``, JPEG
    ``quality``. Mask: the palette PNG resized to the image's new size with ``Image.NEAREST``, saved
    in mode 'P' with the source palette, so its ids (0..20, 255 void) are exactly a subset of the
    source's.

    Returns:
        ``{"images": n, "bytes": total size of out}``.

    Raises:
        FileNotFoundError: ``src`` lacks a list, an image or a mask (the missing path is named).
        ValueError: an image and its mask differ in size, or a mask is not mode 'P'/'L'.
    """
    src, out = Path(src), Path(out)
    lists = {n: src / "ImageSets" / "Segmentation" / f"{n}.txt" for n in VOC_LISTS}
    for p in lists.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; --shared must hold {VOC_SOURCE}/ in the VOC2012 layout")
    names = [ln.strip() for p in lists.values() for ln in p.read_text().splitlines() if ln.strip()]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for n, p in lists.items():
        (out / "ImageSets" / "Segmentation" / f"{n}.txt").write_bytes(p.read_bytes())
    for name in tqdm(names, desc=VOC_SAMPLE, unit="img"):
        ip, mp = src / "JPEGImages" / f"{name}.jpg", src / "SegmentationClass" / f"{name}.png"
        for f in (ip, mp):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (listed in {src}/ImageSets/Segmentation)")
        with Image.open(ip) as pil:
            rgb = pil.convert("RGB")
        with Image.open(mp) as m:
            m.load()
            mask = m.copy()
        if mask.mode not in ("P", "L"):
            raise ValueError(f"{mp}: mask mode {mask.mode!r}, expected a palette ('P') or 'L' PNG")
        if mask.size != rgb.size:
            raise ValueError(f"{mp}: mask is {mask.size} but image {ip} is {rgb.size} (W, H)")
        w, h = rgb.size
        nh, nw = new_size(h, w, max_side)
        if (nh, nw) != (h, w):
            rgb = rgb.resize((nw, nh), Image.BILINEAR)
            mask = mask.resize((nw, nh), Image.NEAREST)
        rgb.save(out / "JPEGImages" / f"{name}.jpg", format="JPEG", quality=quality, optimize=True)
        mask.save(out / "SegmentationClass" / f"{name}.png", format="PNG", optimize=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"images": len(names), "bytes": total}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``make-sample`` to the ``data`` sub-commands."""
    p = sub.add_parser("make-sample", help="build the bundled sample (raysemiseg/sample_data) from ../shared/data")
    p.add_argument("--shared", default="../shared/data",
                   help="folder holding coco-mini/, coco-tiny/ and voc2012-476/")
    p.add_argument("--out", default=str(SAMPLE_DIR), help="output folder (default: the package's sample_data)")
    p.add_argument("--only", choices=("all", "coco", "voc"), default="all",
                   help="which samples to (re)build (default: both)")
    p.add_argument("--max-side", type=int, default=320, help="long side of the resized images (px)")
    p.add_argument("--quality", type=int, default=88, help="JPEG quality of the COCO sample")
    p.add_argument("--voc-quality", type=int, default=90, help="JPEG quality of the VOC sample")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.only in ("all", "coco"):
        r = make_sample(args.shared, args.out, args.max_side, args.quality)
        print(f"coco sample: {r['images']} image entries, {r['annotations']} annotations, "
              f"{r['bytes'] / 1e6:.1f} MB in {args.out}")
    if args.only in ("all", "voc"):
        out = Path(args.out) / VOC_SAMPLE
        r = make_voc_sample(Path(args.shared) / VOC_SOURCE, out, args.max_side, args.voc_quality)
        print(f"voc sample: {r['images']} images, {r['bytes'] / 1e6:.1f} MB in {out}")
    return 0
