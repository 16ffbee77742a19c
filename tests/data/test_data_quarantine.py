"""Planted damage: exactly the damaged rows are quarantined, with their reasons; the rest are kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysemiseg.data.export import encode_voc_mask
from raysemiseg.data.folders import read_folder_records
from raysemiseg.data.sample import sample_sources
from raysemiseg.data.store import Source, build_store, format_summary, open_store
from raysemiseg.data.validate import reason_category
from raysemiseg.labels import builtin


def _images(n: int) -> list[Path]:
    return sorted(sample_sources()[1][1].glob("*.jpg"))[:n]


def _voc_with_damage(root: Path) -> None:
    voc = builtin("voc21")
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    imgs = _images(5)
    names = ["good1", "good2", "truncated", "wrongsize", "id37"]
    for name, src in zip(names, imgs):
        shutil.copy(src, root / "JPEGImages" / f"{name}.jpg")
        w, h = Image.open(src).size
        m = np.zeros((h, w), dtype=np.uint8)
        m[: h // 2, : w // 2] = 8          # cat
        m[-3:, :] = 255                    # void strip
        if name == "wrongsize":
            m = m[:-1]
        if name == "id37":
            m[0, 0] = 37
        (root / "SegmentationClass" / f"{name}.png").write_bytes(encode_voc_mask(m, voc))
    raw = (root / "JPEGImages" / "truncated.jpg").read_bytes()
    (root / "JPEGImages" / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    # "missing" is listed and has a mask, but its JPEG is gone
    (root / "SegmentationClass" / "missing.png").write_bytes(
        (root / "SegmentationClass" / "good1.png").read_bytes())
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names + ["missing"]) + "\n")


def _folders_with_damage(root: Path) -> Path:
    root.mkdir()
    a, b = _images(7)[5:7]
    shutil.copy(a, root / "a.jpg")
    shutil.copy(b, root / "b.jpg")
    csv = root / "labels.csv"
    csv.write_text("image,labels\na.jpg,cat;dog\nb.jpg,\n")
    return csv


def test_planted_damage_quarantined_with_reasons(ray_session, tmp_path) -> None:
    _voc_with_damage(tmp_path / "VOCdamaged")
    csv = _folders_with_damage(tmp_path / "weak")
    r = build_store([Source("voc", (str(tmp_path / "VOCdamaged"),)), Source("folders", (str(csv),))],
                    "voc21", tmp_path / "store", progress=False)
    assert (r.read, r.written, r.quarantined) == (8, 3, 5)
    st = open_store(tmp_path / "store")
    q = {row["image_id"]: row for row in st.read_quarantine().to_pylist()}
    assert {k: reason_category(v["reason"]) for k, v in q.items()} == {
        "VOCdamaged/truncated": "corrupt image",
        "VOCdamaged/wrongsize": "size mismatch",
        "VOCdamaged/id37": "class id outside label space",
        "VOCdamaged/missing": "missing file",
        "weak/b": "empty label set",
    }
    assert "[37]" in q["VOCdamaged/id37"]["reason"]
    assert q["VOCdamaged/missing"]["path"].endswith("JPEGImages/missing.jpg")
    assert q["VOCdamaged/truncated"]["path"].endswith("truncated.jpg")
    kept = {row["image_id"]: row for row in st.read_table().to_pylist()}
    assert set(kept) == {"VOCdamaged/good1", "VOCdamaged/good2", "weak/a"}
    assert kept["VOCdamaged/good1"]["labels"] == [8] and kept["VOCdamaged/good1"]["supervision"] == "pixel"
    assert kept["weak/a"]["labels"] == [8, 12] and kept["weak/a"]["mask"] is None
    assert kept["weak/a"]["supervision"] == "image"
    text = format_summary(st)
    assert "rows read 8 = written 3 + quarantined 5" in text and "missing file" in text


def test_class_folders(tmp_path) -> None:
    voc = builtin("voc21")
    for cls, src in zip(("cat", "tv"), _images(2)):  # "tv" is COCO's name for tvmonitor
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        shutil.copy(src, tmp_path / "imgs" / cls / "x.jpg")
    recs = read_folder_records(tmp_path / "imgs", voc)
    assert [r["image_id"] for r in recs] == ["imgs/cat/x", "imgs/tv/x"]
    assert [r["supervision"] for r in recs] == ["image", "image"]
    assert '"labels": [20]' in recs[1]["payload"]
    (tmp_path / "imgs" / "unicorn").mkdir()
    with pytest.raises(ValueError, match="unicorn"):
        read_folder_records(tmp_path / "imgs", voc)
