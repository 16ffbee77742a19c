"""VOC masks, the VOC reader, and the store -> VOCdevkit -> store round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from raysemiseg.data.export import export_voc, voc_name
from raysemiseg.data.schema import decode_mask
from raysemiseg.data.store import Source, build_store, open_store
from raysemiseg.data.voc import decode_voc_mask, read_voc_records
from raysemiseg.labels import builtin

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "voc-mask-samples"

# classes of the 18 genuine VOC 2012 masks (read off the VOC annotations of these images)
EXPECTED = {
    "2007_000032": {"aeroplane", "person"}, "2007_000039": {"tvmonitor"}, "2007_000042": {"train"},
    "2007_000061": {"boat"}, "2007_000063": {"chair", "dog"}, "2007_000068": {"bird"},
    "2007_000129": {"bicycle", "person"}, "2007_000170": {"bottle", "person"}, "2007_000175": {"sheep"},
    "2007_000250": {"bottle", "diningtable"}, "2007_000332": {"horse"}, "2007_000364": {"motorbike", "person"},
    "2007_000452": {"chair", "sofa"}, "2007_000464": {"cow"}, "2007_000515": {"bicycle", "car", "person"},
    "2007_000528": {"cat"}, "2007_000648": {"aeroplane", "bus", "car", "person"},
    "2007_000661": {"chair", "pottedplant", "sofa"},
}


def test_genuine_voc_masks_decode_to_class_ids() -> None:
    voc = builtin("voc21")
    seen: set[int] = set()
    for p in sorted(FIXTURES.glob("*.png")):
        m = decode_voc_mask(p.read_bytes(), voc, p)
        ids = set(np.unique(m).tolist())
        assert 255 in ids and 0 in ids, p.name          # void border kept as 255, background 0
        assert {voc.names[i] for i in ids - {0, 255}} == EXPECTED[p.stem], p.name
        # the decoded index is the class whose VOC colour the pixel shows
        rgb = np.asarray(Image.open(p).convert("RGB"))
        for i in ids - {255}:
            assert (rgb[m == i] == voc.palette[i]).all()
        assert (rgb[m == 255] == [224, 224, 192]).all()
        seen |= ids
    assert seen == set(range(21)) | {255}                   # all 20 classes covered


def test_store_export_voc_store_round_trip(sample_store, tmp_path) -> None:
    st = open_store(sample_store)
    vocdir = tmp_path / "VOCexport"
    r = export_voc(st, vocdir, progress=False)
    assert r == {"images": 318, "masks": 318, "annotations": 318 - _no_box_rows(st)}
    assert len((vocdir / "ImageSets/Segmentation/train.txt").read_text().split()) == 160
    recs = read_voc_records(vocdir, builtin("voc21"))
    assert len(recs) == 318 and {r["split"] for r in recs} == {"train", "val"}
    back = build_store([Source("voc", (str(vocdir),))], "voc21", tmp_path / "back", progress=False)
    assert (back.read, back.written, back.quarantined) == (318, 318, 0)
    a = {row["image_id"]: row for row in st.read_table().to_pylist()}
    b = {row["image_id"]: row for row in open_store(tmp_path / "back").read_table().to_pylist()}
    assert set(b) == {f"VOCexport/{voc_name(k)}" for k in a}
    for k, ra in a.items():
        rb = b[f"VOCexport/{voc_name(k)}"]
        assert np.array_equal(decode_mask(ra["mask"]), decode_mask(rb["mask"])), k
        assert ra["image"] == rb["image"] and ra["labels"] == rb["labels"] and ra["split"] == rb["split"]
        assert [bx["class_id"] for bx in ra["boxes"]] == [bx["class_id"] for bx in rb["boxes"]]
        for x, y in zip(ra["boxes"], rb["boxes"]):
            assert abs(x["x0"] - y["x0"]) < 0.01 and abs(x["y1"] - y["y1"]) < 0.01


def _no_box_rows(st) -> int:
    return sum(1 for b in st.read_table(columns=["boxes"]).column("boxes").to_pylist() if not b)


# ------------------------------------------------------------------------------------------
# boxes derived from masks (no Annotations/ XML)
def _hand_mask() -> np.ndarray:
    """40 x 50 VOC-21 mask (2000 px: the 0.1 % speck threshold is 2 px), boxes worked out by hand."""
    m = np.zeros((40, 50), dtype=np.uint8)
    m[2:6, 3:8] = 8            # cat A: rows 2-5, cols 3-7 (20 px)      -> box (3, 2, 8, 6)
    m[0:10, 8] = 255           # void right of A and below it: not part of any component
    m[6, 3:8] = 255
    m[10:20, 20:30] = 8        # cat B: 100 px                            -> box (20, 10, 30, 20)
    m[30, 45] = 8              # cat speck: 1 px < 2 px                   -> dropped
    m[36, 20:22] = 8           # cat C: 2 px = threshold                  -> box (20, 36, 22, 37)
    m[25:28, 5:8] = 12         # dog: two 3x3 squares meeting at a corner (27, 7)/(28, 8):
    m[28:31, 8:11] = 12        #   one 8-connected component              -> box (5, 25, 11, 31)
    m[35, 40] = 15             # person: 1 px only, its largest component -> kept, box (40, 35, 41, 36)
    return m


HAND_BOXES = [(8, 3, 2, 8, 6), (8, 20, 10, 30, 20), (8, 20, 36, 22, 37), (12, 5, 25, 11, 31), (15, 40, 35, 41, 36)]


def _tuples(boxes) -> list[tuple]:
    return [(int(b["class_id"]), b["x0"], b["y0"], b["x1"], b["y1"]) for b in boxes]


def test_boxes_from_mask_hand_made() -> None:
    from raysemiseg.data.voc import boxes_from_mask

    assert _tuples(boxes_from_mask(_hand_mask(), builtin("voc21"))) == HAND_BOXES
    # a higher threshold (1 % = 20 px) also drops cat C; A (20 px) stays; dog (18 px) and
    # person (1 px) keep their only component
    assert _tuples(boxes_from_mask(_hand_mask(), builtin("voc21"), min_area_frac=0.01)) == [
        HAND_BOXES[0], HAND_BOXES[1], HAND_BOXES[3], HAND_BOXES[4]]


def _palette_png(m: np.ndarray, path: Path) -> None:
    im = Image.fromarray(m, mode="P")
    im.putpalette([int(v) for v in builtin("voc21").palette.ravel()])
    im.save(path)


def test_voc_build_derives_boxes_without_xml_and_xml_wins(ray_session, tmp_path) -> None:
    from raysemiseg.cli import main

    root = tmp_path / "VOCmini"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (root / sub).mkdir(parents=True)
    m = _hand_mask()
    for seed, name in enumerate(("noxml", "withxml")):  # distinct bytes, else the second is a duplicate
        rgb = np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg")
        _palette_png(m, root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("noxml\nwithxml\n")
    (root / "Annotations/withxml.xml").write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax>"
        "<ymax>12</ymax></bndbox></object></annotation>")
    assert main(["data", "build", "--voc", str(root), "--label-space", "voc21", "--out", str(tmp_path / "S")]) == 0
    rows = {r["image_id"]: r for r in open_store(tmp_path / "S").read_table().to_pylist()}
    a, b = rows["VOCmini/noxml"], rows["VOCmini/withxml"]
    assert _tuples(a["boxes"]) == HAND_BOXES
    assert a["labels"] == [8, 12, 15]
    from raysemiseg.data.voc import DERIVED_BOXES

    assert json.loads(a["provenance"]) == {"boxes": DERIVED_BOXES}
    assert DERIVED_BOXES == "derived-from-mask:cc8,min_area=0.1%HW,largest-per-class-kept"
    assert _tuples(b["boxes"]) == [(8, 1.0, 2.0, 10.0, 12.0)]   # the XML's box (1-based inclusive -> 0-based)
    assert json.loads(b["provenance"]) == {"boxes": "voc-xml"}


def test_derived_boxes_on_a_real_voc_image() -> None:
    """2007_000033 of voc2012-476 (bundled at 320 x 234): three aeroplanes in the photo, but the
    middle one touches the big one in the mask, so the mask holds two aeroplane components. Checked
    by drawing the boxes on the image: the big aeroplane (with the touching one) and the far-right
    one. On the full-size 500 x 366 mask the same rule gives (8, 109, 500, 262) and
    (419, 200, 483, 223), i.e. these boxes x 0.64 within a pixel."""
    from raysemiseg.data.sample import voc_sample_dir
    from raysemiseg.data.voc import boxes_from_mask

    voc = builtin("voc21")
    p = voc_sample_dir() / "SegmentationClass" / "2007_000033.png"
    m = decode_voc_mask(p.read_bytes(), voc, p)
    assert m.shape == (234, 320)
    assert _tuples(boxes_from_mask(m, voc)) == [(1, 5.0, 70.0, 320.0, 168.0), (1, 268.0, 128.0, 308.0, 143.0)]


def test_bundled_voc_sample_store(ray_session, tmp_path, capsys) -> None:
    """The experiment builder's ``sample: voc`` store: all 476 rows, the lists' 326/150 split, every
    row with mask-derived boxes, all 20 classes in both splits; ``data summary`` lists all 21."""
    from raysemiseg.cli import main
    from raysemiseg.data.store import summarize
    from raysemiseg.data.voc import DERIVED_BOXES
    from raysemiseg.experiment import ensure_store

    st = open_store(ensure_store(tmp_path / "S", "voc21", sample="voc"))
    t = st.read_table(columns=["split", "labels", "boxes", "provenance", "height", "width"]).to_pylist()
    assert len(t) == 476 and st.manifest["counts"] == {"read": 476, "written": 476, "quarantined": 0}
    assert sum(r["split"] == "train" for r in t) == 326 and sum(r["split"] == "val" for r in t) == 150
    assert all(max(r["height"], r["width"]) <= 320 for r in t)
    assert all(json.loads(r["provenance"]) == {"boxes": DERIVED_BOXES} for r in t)
    # every image-level label has a box of its class (the largest component is always kept)
    assert all(set(r["labels"]) == {b["class_id"] for b in r["boxes"]} for r in t)
    for split, lo in (("train", 12), ("val", 6)):  # the data README: train 12-41 images per class, val 6-14
        counts = [sum(c in r["labels"] for r in t if r["split"] == split) for c in range(1, 21)]
        assert min(counts) == lo, split
    s = summarize(st)
    assert len(s["class_images"]) == 20 and min(s["class_images"].values()) >= 18
    assert main(["data", "summary", str(tmp_path / "S")]) == 0
    out = capsys.readouterr().out
    assert "classes present: 20 of 20" in out and "rows read 476 = written 476 + quarantined 0" in out
    assert "in 476 rows (476 rows with boxes derived from their masks)" in out
    assert "  background                -     475   (background)" in out  # every class listed, bg too
