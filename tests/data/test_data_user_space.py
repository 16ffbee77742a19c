"""A user label space (YAML, 11 classes) end to end through the CLI: build, summary, export-voc, re-read."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO

from raysemiseg.cli import main
from raysemiseg.data.sample import sample_sources
from raysemiseg.data.schema import decode_mask
from raysemiseg.data.store import Source, build_store, open_store

NAMES = ["background", "person", "car", "chair", "dog", "cat", "bottle", "cup", "dining table", "giraffe", "bus"]


def test_user_space_11_classes_end_to_end(ray_session, tmp_path, capsys) -> None:
    yml = tmp_path / "street11.yaml"
    yml.write_text("names: [" + ", ".join(f'"{n}"' for n in NAMES) + "]\nbackground: background\n")
    ann, imgs = sample_sources()[1]  # coco-mini val2017 (79 images)
    store = tmp_path / "store"
    assert main(["data", "build", "--coco", str(ann), str(imgs), "--label-space", str(yml), "--out", str(store)]) == 0
    st = open_store(store)
    assert st.label_space.names == tuple(NAMES) and st.label_space.name == "street11"
    # per-class image counts equal a direct pycocotools count (COCO names, incl. "dining table" and giraffe)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    expected = {n: len(coco.getImgIds(catIds=coco.getCatIds(catNms=[n]))) for n in NAMES[1:]}
    capsys.readouterr()
    assert main(["data", "summary", str(store)]) == 0
    out = capsys.readouterr().out
    assert "label space street11 (11 classes" in out and "rows read 79 = written 79 + quarantined 0" in out
    for n, k in expected.items():
        assert f"  {n:<20} {k:>6}" in out, n
    masks = [decode_mask(m) for m in st.read_table(columns=["mask"]).column("mask").to_pylist()]
    assert max(int(m[m != 255].max()) for m in masks) == 10
    # export, then read the export back: the VOC reader takes the space from label_space.yaml
    assert main(["data", "export-voc", str(store), str(tmp_path / "voc")]) == 0
    assert (tmp_path / "voc" / "label_space.yaml").is_file()
    r = build_store([Source("voc", (str(tmp_path / "voc"),))], yml, tmp_path / "back", progress=False)
    assert (r.written, r.quarantined) == (79, 0)
    back = [decode_mask(m) for m in open_store(tmp_path / "back").read_table(columns=["mask"]).column("mask").to_pylist()]
    assert all(np.array_equal(a, b) for a, b in zip(masks, back))
