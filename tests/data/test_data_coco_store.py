"""COCO reader and the Parquet image store on the bundled real sample."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysemiseg.data.coco import category_lut, coco_semantic_mask
from raysemiseg.data.sample import sample_sources
from raysemiseg.data.schema import IMAGE_STORE_SCHEMA, decode_image, decode_mask
from raysemiseg.data.store import Source, build_store, format_summary, open_store, summarize
from raysemiseg.labels import COCO_TO_VOC_RENAME, VOC_CLASSES, builtin


def _square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_overlap_rule_smaller_on_top_crowd_under() -> None:
    # 10x10 image: big square (area 81) class 1, small square (area 9) class 2 inside it,
    # crowd RLE covering the whole image with class 3 -> under everything.
    from pycocotools import mask as mu

    crowd = mu.encode(np.asfortranarray(np.ones((10, 10), dtype=np.uint8)))
    anns = [
        {"id": 1, "class_id": 2, "iscrowd": 0, "area": 9.0, "segmentation": _square(3, 3, 6, 6)},
        {"id": 2, "class_id": 1, "iscrowd": 0, "area": 81.0, "segmentation": _square(0, 0, 9, 9)},
        {"id": 3, "class_id": 3, "iscrowd": 1, "area": 100.0, "segmentation": crowd},
    ]
    m = coco_semantic_mask(anns, 10, 10)
    assert m[4, 4] == 2          # small instance on top of the big one
    assert m[1, 1] == 1          # big instance over the crowd region
    assert m[9, 9] == 3          # crowd where nothing else is
    # the rule does not depend on the listing order
    assert (coco_semantic_mask(anns[::-1], 10, 10) == m).all()


def test_category_lut_uses_voc_renames() -> None:
    cats = [{"id": 5, "name": "airplane"}, {"id": 25, "name": "giraffe"}, {"id": 1, "name": "person"}]
    voc, c80 = builtin("voc21"), builtin("coco80")
    assert category_lut(cats, voc) == {5: voc.index("aeroplane"), 1: voc.index("person")}
    assert category_lut(cats, c80) == {5: c80.index("airplane"), 25: c80.index("giraffe"), 1: c80.index("person")}


def _pycocotools_image_counts() -> dict[str, int]:
    """Images per VOC class over the distinct images of the sample, counted with pycocotools."""
    from pycocotools.coco import COCO

    imgs: dict[str, set[int]] = {v: set() for v in VOC_CLASSES[1:]}
    for ann, _ in sample_sources():
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann))
        for cat in coco.loadCats(coco.getCatIds()):
            v = COCO_TO_VOC_RENAME.get(cat["name"], cat["name"])
            if v in imgs:
                imgs[v] |= set(coco.getImgIds(catIds=[cat["id"]]))
    return {k: len(v) for k, v in imgs.items()}


def test_sample_store_counts_match_pycocotools(sample_store) -> None:
    st = open_store(sample_store)
    s = summarize(st)
    assert s["counts"] == {"read": 319, "written": 318, "quarantined": 1}
    assert s["quarantine"] == {"duplicate": 1}
    q = st.read_quarantine().to_pylist()
    assert q[0]["image_id"] == "coco-tiny/000000435206" and "coco-mini/000000435206" in q[0]["reason"]
    assert s["splits"] == {"train": 160, "val": 158} and s["supervision"] == {"pixel": 318}
    assert s["class_images"] == _pycocotools_image_counts()
    assert all(n > 0 for n in s["class_images"].values())  # all 20 VOC classes present
    assert s["class_images"]["cow"] == 3 and s["class_images"]["person"] == 163
    text = format_summary(st, s)
    assert "classes present: 20 of 20" in text and "duplicate" in text


def test_sample_store_rows_are_valid(sample_store) -> None:
    st = open_store(sample_store)
    t = st.read_table()
    assert t.schema.names == IMAGE_STORE_SCHEMA.names
    assert len(set(t.column("image_id").to_pylist())) == t.num_rows == 318
    for row in t.slice(0, 12).to_pylist():
        img, mask = decode_image(row["image"]), decode_mask(row["mask"])
        assert img.shape == (row["height"], row["width"], 3) and max(img.shape[:2]) <= 320
        assert mask.shape == img.shape[:2]
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present <= set(row["labels"])  # pixel classes are among the image-level labels
        assert all(0 <= b["x0"] <= b["x1"] <= row["width"] + 1 for b in row["boxes"])
    assert st.read_table(columns=["image_id"], filter_split="val").num_rows == 158


def test_rebuild_is_identical(sample_store) -> None:
    # rebuild over the existing store: it is replaced, and the rows and file names are the same
    before = open_store(sample_store)
    names, table = [p.name for p in before.files], before.read_table()
    srcs = [Source("coco", (str(a), str(i))) for a, i in sample_sources()]
    r = build_store(srcs, "voc21", sample_store, progress=False)
    assert (r.read, r.written, r.quarantined) == (319, 318, 1)
    after = open_store(sample_store)
    assert [p.name for p in after.files] == names
    assert after.read_table().equals(table)
    assert pq.read_table(after.files[0]).schema.metadata[b"raysemiseg.schema"] == b"image_store"


def test_dataset_api(sample_store) -> None:
    ds = open_store(sample_store).dataset(columns=["image_id", "labels"], filter_split="train")
    rows = ds.take_all()
    assert len(rows) == 160 and set(rows[0]) == {"image_id", "labels"}


def test_refuses_non_store_folder(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an image store"):
        build_store([Source("coco", tuple(map(str, sample_sources()[0])))], "voc21", tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="not an image store"):
        open_store(tmp_path)


def test_hash_partitions_grow_with_the_store_not_with_ray_defaults() -> None:
    # one partition per 4,096 rows, at least 1 (Ray's default of 200 cost ~5 s per small build), at most 10,000
    from raysemiseg.data.store import hash_partitions

    assert [hash_partitions(n) for n in (0, 318, 4095, 4096, 12_300, 10_000_000, 10**12)] == [1, 1, 1, 1, 3, 2441, 10_000]
