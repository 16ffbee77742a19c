"""VOC masks, the VOC reader, and the store -> VOCdevkit -> store round trip."""

from __future__ import annotations

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
