"""Splits: C3S split-sets, I3S fraction / list / per-class, reproducibility, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from raysemiseg.cli import main
from raysemiseg.data.schema import decode_mask
from raysemiseg.data.splits import C3S_STRONG, SplitSpec, c3s_classes, make_split, read_split, split_counts
from raysemiseg.data.store import open_store
from raysemiseg.labels import VOC_CLASSES, builtin


def test_c3s_class_sets() -> None:
    """Xiao et al. 2018, Table 2 (DESIGN.md section 4): split-set 1 strong = bicycle, boat, bus, car,
    cat, chair, cow, diningtable, person, tvmonitor; split-set 2 = split-set 1 reversed; split-set 3
    strong = chair, cow, dog, motorbike, person, train."""
    voc = builtin("voc21")
    s1, w1 = c3s_classes(1, voc)
    s2, w2 = c3s_classes(2, voc)
    s3, w3 = c3s_classes(3, voc)
    strong1 = {"bicycle", "boat", "bus", "car", "cat", "chair", "cow", "diningtable", "person", "tvmonitor"}
    weak1 = {"aeroplane", "bird", "bottle", "dog", "horse", "motorbike", "pottedplant", "sheep", "sofa", "train"}
    assert {voc.names[i] for i in s1} == strong1 and {voc.names[i] for i in w1} == weak1
    assert set(C3S_STRONG[1]) == strong1
    assert {voc.names[i] for i in s2} == weak1 and {voc.names[i] for i in w2} == strong1
    assert (s2, w2) == (w1, s1)                       # split-set 2 = split-set 1 reversed
    assert {voc.names[i] for i in s3} == {"chair", "cow", "dog", "motorbike", "person", "train"} and len(w3) == 14
    with pytest.raises(ValueError, match="coco80"):
        c3s_classes(4, voc)
    c80 = builtin("coco80")
    s4, w4 = c3s_classes(4, c80)
    assert len(s4) == 60 and len(w4) == 20 and c80.index("couch") in w4 and c80.index("giraffe") in s4


def test_c3s_split_set_1_has_no_weak_pixels_in_strong_rows(sample_store, sample_split, capsys) -> None:
    st = open_store(sample_store)
    t, spec = read_split(sample_split)
    assert spec["kind"] == "c3s" and spec["split_set"] == 1 and spec["mixed"] == "weak"
    _, weak = c3s_classes(1, st.label_space)
    rows = {r["image_id"]: r for r in st.read_table(columns=["image_id", "mask", "labels"]).to_pylist()}
    assert t.num_rows == len(rows)                    # every store row exactly once
    roles = dict(zip(t.column("image_id").to_pylist(), t.column("role").to_pylist()))
    splits = dict(zip(t.column("image_id").to_pylist(), t.column("split").to_pylist()))
    n_strong = 0
    for iid, role in roles.items():
        if role == "strong" and splits[iid] == "train":
            n_strong += 1
            m = decode_mask(rows[iid]["mask"])
            assert not (set(np.unique(m).tolist()) & weak), iid
        if role == "weak":
            assert set(rows[iid]["labels"]) & weak       # weak rows are the mixed/weak-class images
    c = split_counts(t)
    assert n_strong == c["train"]["strong"] > 0 and c["train"]["weak"] > 0
    # the CLI prints the same counts
    assert main(["data", "split", str(sample_store), "--c3s", "1", "--out", str(sample_store.parent / "c.parquet")]) == 0
    out = capsys.readouterr().out
    assert f"train        {c['train']['strong']:>7} {c['train']['weak']:>7} {c['train']['none']:>7}" in out


def test_c3s_mixed_none_drops_mixed_images(sample_store) -> None:
    a = make_split(sample_store, SplitSpec("c3s", split_set=1))
    b = make_split(sample_store, SplitSpec("c3s", split_set=1, mixed="none"))
    ca, cb = split_counts(a)["train"], split_counts(b)["train"]
    assert cb["weak"] == 0 and cb["none"] == ca["none"] + ca["weak"] and cb["strong"] == ca["strong"]


def test_i3s_fraction_reproducible(sample_store) -> None:
    a = make_split(sample_store, SplitSpec("i3s-fraction", fraction=0.25, seed=3))
    b = make_split(sample_store, SplitSpec("i3s-fraction", fraction=0.25, seed=3))
    c = make_split(sample_store, SplitSpec("i3s-fraction", fraction=0.25, seed=4))
    assert a.equals(b) and not a.equals(c)
    assert split_counts(a) == {"train": {"strong": 40, "weak": 120, "none": 0},
                               "val": {"strong": 158, "weak": 0, "none": 0}}
    # fraction 0 = weak-only (WSSL's "Weak" rows): every training row weak, val keeps its masks
    assert split_counts(make_split(sample_store, SplitSpec("i3s-fraction", fraction=0.0))) == {
        "train": {"strong": 0, "weak": 160, "none": 0}, "val": {"strong": 158, "weak": 0, "none": 0}}
    with pytest.raises(ValueError, match="0 <= fraction <= 1"):
        SplitSpec("i3s-fraction", fraction=1.5)


def test_i3s_list_and_per_class(sample_store, tmp_path) -> None:
    st = open_store(sample_store)
    train_ids = st.read_table(columns=["image_id"], filter_split="train").column("image_id").to_pylist()
    lst = tmp_path / "strong.txt"
    lst.write_text("\n".join(train_ids[:7]) + "\n")
    t = make_split(st, SplitSpec("i3s-list", strong_list=str(lst)))
    roles = dict(zip(t.column("image_id").to_pylist(), t.column("role").to_pylist()))
    assert [roles[i] for i in train_ids[:8]] == ["strong"] * 7 + ["weak"]
    lst.write_text("nope/123\n")
    with pytest.raises(ValueError, match="not in the store"):
        make_split(st, SplitSpec("i3s-list", strong_list=str(lst)))
    n = 2
    t = make_split(st, SplitSpec("i3s-per-class", per_class=n, seed=0))
    labels = dict(zip(*(st.read_table(columns=["image_id", "labels"], filter_split="train").column(c).to_pylist()
                        for c in ("image_id", "labels"))))
    strong = [i for i, r, s in zip(*(t.column(c).to_pylist() for c in ("image_id", "role", "split")))
              if r == "strong" and s == "train"]
    for c in range(1, 21):
        avail = sum(1 for ls in labels.values() if c in ls)
        got = sum(1 for i in strong if c in labels[i])
        assert got >= min(n, avail), VOC_CLASSES[c]
    assert len(strong) <= 20 * n
    assert make_split(st, SplitSpec("i3s-per-class", per_class=n, seed=0)).equals(t)


def test_bad_spec_errors() -> None:
    with pytest.raises(ValueError, match="fraction"):
        SplitSpec("i3s-fraction", fraction=1.5)
    with pytest.raises(ValueError, match="valid"):
        SplitSpec("random")
