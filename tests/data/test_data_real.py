"""The real-data build on ../shared/data (318 full-size COCO images); skipped only where it is absent."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from raysemiseg.data.store import Source, build_store, open_store, summarize
from raysemiseg.labels import COCO_TO_VOC_RENAME, VOC_CLASSES

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "coco-mini").is_dir(),
                    reason=f"{SHARED} is absent (a user's fresh clone); CI has it")
def test_real_coco_build_matches_pycocotools(ray_session, tmp_path) -> None:
    from pycocotools.coco import COCO

    srcs = [(SHARED / d / "annotations" / f"instances_{s}.json", SHARED / d / s)
            for d in ("coco-mini", "coco-tiny") for s in ("train2017", "val2017")]
    r = build_store([Source("coco", (str(a), str(i))) for a, i in srcs], "voc21", tmp_path / "S", progress=False)
    assert (r.read, r.written, r.quarantined) == (319, 318, 1)
    imgs: dict[str, set[int]] = {v: set() for v in VOC_CLASSES[1:]}
    for a, _ in srcs:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(a))
        for cat in coco.loadCats(coco.getCatIds()):
            v = COCO_TO_VOC_RENAME.get(cat["name"], cat["name"])
            if v in imgs:
                imgs[v] |= set(coco.getImgIds(catIds=[cat["id"]]))
    s = summarize(open_store(tmp_path / "S"))
    assert s["class_images"] == {k: len(v) for k, v in imgs.items()}
    assert min(s["class_images"].values()) >= 3  # all 20 VOC classes present (cow in 3)
