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


# ------------------------------------------------------------------------------------------
# a VOC-layout folder of a custom dataset: masks hold ids of the user's own space
CUSTOM11 = ["road", "sidewalk", "building", "person", "car", "bicycle", "tree", "sky", "bus", "sign", "pole"]


def _custom_voc_folder(root, masks: dict[str, np.ndarray]):
    from PIL import Image

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for seed, (name, m) in enumerate(masks.items()):
        rgb = np.random.default_rng(seed).integers(0, 255, m.shape + (3,), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(m.astype(np.uint8), mode="L").save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(masks) + "\n")
    return root


def _bands(ids: list[int], h: int = 24, w: int = 32) -> np.ndarray:
    """One horizontal band per id (ids in order), a void (255) column at x = 0."""
    m = np.zeros((h, w), dtype=np.uint8)
    for k, b in enumerate(np.array_split(np.arange(h), len(ids))):
        m[b] = ids[k]
    m[:, 0] = 255
    return m


def test_custom_voc_folder_masks_read_in_the_target_space(ray_session, tmp_path, capsys) -> None:
    """11 classes, no background, no label_space.yaml in the folder, passed as --label-space: the
    stored masks are the files' ids unchanged (read as VOC-21 ids, road (0) became void and
    building (2) "bicycle" -> custom id 5), and the summary lists all 11 classes, pole with 0."""
    yml = tmp_path / "city11.yaml"
    yml.write_text("names: [" + ", ".join(CUSTOM11) + "]\n")           # no background
    masks = {"a": _bands([0, 2, 3]), "b": _bands([4, 6, 7]), "c": _bands(list(range(10)))}
    root = _custom_voc_folder(tmp_path / "city", masks)
    assert main(["data", "build", "--voc", str(root), "--label-space", str(yml), "--out", str(tmp_path / "S")]) == 0
    st = open_store(tmp_path / "S")
    rows = {r["image_id"]: r for r in st.read_table().to_pylist()}
    assert len(rows) == 3
    for name, m in masks.items():
        assert np.array_equal(decode_mask(rows[f"city/{name}"]["mask"]), m), name
    assert rows["city/a"]["labels"] == [0, 2, 3] and rows["city/b"]["labels"] == [4, 6, 7]
    capsys.readouterr()
    assert main(["data", "summary", str(tmp_path / "S")]) == 0
    out = capsys.readouterr().out
    # images per class, counted by hand from the three masks above
    expected = {"road": 2, "sidewalk": 1, "building": 2, "person": 2, "car": 2, "bicycle": 1, "tree": 2,
                "sky": 2, "bus": 1, "sign": 1, "pole": 0}
    for n, k in expected.items():
        assert f"  {n:<20} {k:>6}" in out, n
    assert "classes present: 10 of 11" in out


def test_mask_mapping_that_loses_present_classes_is_an_error(ray_session, tmp_path, capsys) -> None:
    """VOC-21 masks (bg / cat / person bands) into spaces that lack a class the masks hold: an error
    naming the class, nothing built; --allow-dropped-classes maps anyway and says so per row."""
    import json

    from raysemiseg.data.voc import read_voc_records
    from raysemiseg.labels import load_label_space

    root = _custom_voc_folder(tmp_path / "vocish", {"p": _bands([0, 8, 15]), "q": _bands([0, 15])})
    spaces = {}
    for name, names in (("pd", ["background", "person", "dog"]), ("nobg", ["person", "cat"]),
                        ("cp", ["background", "cat", "person"])):
        y = tmp_path / f"{name}.yaml"
        y.write_text("names: [" + ", ".join(names) + "]\n" + ("background: background\n" if names[0] == "background" else ""))
        spaces[name] = y
    base = ["data", "build", "--voc", str(root), "--mask-space", "voc21", "--out"]
    # cat has no counterpart in pd: merged into the background -> error
    assert main(base + [str(tmp_path / "S1"), "--label-space", str(spaces["pd"])]) == 2
    err = capsys.readouterr().err
    assert "'cat' (id 8) -> background, in 1 masks" in err and "--allow-dropped-classes" in err
    assert not (tmp_path / "S1" / "store.json").exists()
    # nobg has no background: the masks' background pixels would turn void -> error
    assert main(base + [str(tmp_path / "S2"), "--label-space", str(spaces["nobg"])]) == 2
    assert "'background' (id 0) -> void, in 2 masks" in capsys.readouterr().err
    # cp lacks 18 VOC classes, but none is in these masks: no error, ids remapped by name
    recs = read_voc_records(root, load_label_space(spaces["cp"]), mask_space="voc21")
    assert json.loads(recs[0]["provenance"]) == {"boxes": "derived-from-mask:cc8,min_area=0.1%HW,largest-per-class-kept",
                                                 "mask_space": "voc21"}
    # the explicit option: cat -> background (0), person (15) -> 1, void kept
    assert main(base + [str(tmp_path / "S3"), "--label-space", str(spaces["pd"]), "--allow-dropped-classes"]) == 0
    row = {r["image_id"]: r for r in open_store(tmp_path / "S3").read_table().to_pylist()}["vocish/p"]
    assert np.array_equal(decode_mask(row["mask"]), _bands([0, 0, 1]))
    prov = json.loads(row["provenance"])
    assert prov["mask_space"] == "voc21" and "cat->background" in prov["dropped_classes"]
    assert "dog->background" not in prov["dropped_classes"] and len(prov["dropped_classes"]) == 18  # 20 VOC classes - person, dog


def test_voc_palette_masks_into_another_space_warn(recwarn) -> None:
    """Real VOC masks (bundled sample) into coco80 without --mask-space: ids read as coco80 ids
    (VOC aeroplane = 1 would be coco80 person), so the reader warns and names the way out; with
    --mask-space voc21 the 20 classes map by name (aeroplane -> airplane ...) with no loss, no warning."""
    import warnings

    import pytest

    from raysemiseg.data.sample import voc_sample_dir
    from raysemiseg.data.voc import read_voc_records
    from raysemiseg.labels import builtin

    with pytest.warns(UserWarning, match=r"read as 'coco80' ids \(1=person\).*--mask-space voc21"):
        read_voc_records(voc_sample_dir(), builtin("coco80"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = read_voc_records(voc_sample_dir(), builtin("coco80"), mask_space="voc21")
    assert len(recs) == 476
    assert builtin("voc21").mapping_to(builtin("coco80"))[1] == builtin("coco80").index("airplane")
