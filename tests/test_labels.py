"""Label spaces: built-ins, YAML user spaces, mappings, colourising."""

from __future__ import annotations

import numpy as np
import pytest

from raysemiseg.labels import COCO_CLASSES, VOC_CLASSES, builtin, load_label_space


def test_builtin_sizes_and_background() -> None:
    voc, c80, c60 = builtin("voc21"), builtin("coco80"), builtin("coco60")
    assert (voc.num_classes, c80.num_classes, c60.num_classes) == (21, 81, 61)
    assert voc.background_id == 0 and voc.ignore_index == 255
    assert voc.names[15] == "person" and voc.names[20] == "tvmonitor"
    # VOC palette: the documented colours of ids 1 (aeroplane) and 15 (person)
    assert voc.palette[1].tolist() == [128, 0, 0] and voc.palette[15].tolist() == [192, 128, 128]
    with pytest.raises(KeyError, match="valid"):
        builtin("voc22")


def test_coco_to_voc_mapping() -> None:
    c80, voc, c60 = builtin("coco80"), builtin("voc21"), builtin("coco60")
    lut = c80.mapping_to(voc)
    # the six renames and a shared name
    for coco, v in [("airplane", "aeroplane"), ("motorcycle", "motorbike"), ("dining table", "diningtable"),
                    ("potted plant", "pottedplant"), ("couch", "sofa"), ("tv", "tvmonitor"), ("person", "person")]:
        assert lut[c80.index(coco)] == voc.index(v)
    # 20 COCO classes reach a VOC class, the other 60 become background
    mapped = [lut[c80.index(n)] for n in COCO_CLASSES]
    assert sum(m != 0 for m in mapped) == 20 and sorted(set(mapped) - {0}) == list(range(1, 21))
    assert set(c60.names[1:]).isdisjoint(VOC_CLASSES) and "giraffe" in c60
    assert lut[255] == 255
    # a mask converts through the table
    m = np.array([[c80.index("couch"), c80.index("giraffe")], [0, 255]])
    assert lut[m].tolist() == [[voc.index("sofa"), 0], [0, 255]]


def test_user_space_yaml(tmp_path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("names: [bg, cat, dog]\npalette: [[0,0,0],[255,0,0],[0,255,0]]\nbackground: bg\n")
    sp = load_label_space(f)
    assert sp.name == "mine" and sp.num_classes == 3 and sp.background_id == 0 and sp.ignore_index == 255
    assert sp.colorize(np.array([[1, 255]])).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    assert sp.check_ids(np.array([0, 2, 3, 255, 37])).tolist() == [3, 37]
    bad = tmp_path / "bad.yaml"
    bad.write_text("names: [a, a]\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_label_space(bad)
    bad.write_text("names: [a, b]\ncolors: []\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_label_space(bad)
    with pytest.raises(FileNotFoundError):
        load_label_space(tmp_path / "nope.yaml")


def test_mapping_losses() -> None:
    from raysemiseg.labels import LabelSpace

    voc, coco80, coco60 = builtin("voc21"), builtin("coco80"), builtin("coco60")
    assert voc.mapping_losses(voc) == {} and voc.mapping_losses(coco80) == {}   # all 20 renamed/kept
    # coco60 holds no VOC class: all 20 merge into its background, background stays background
    assert voc.mapping_losses(coco60) == {i: "background" for i in range(1, 21)}
    # COCO -> VOC: the 60 non-VOC categories are lost, the renamed six (airplane, couch, ...) are not
    lost = coco80.mapping_losses(voc)
    assert len(lost) == 60 and coco80.index("couch") not in lost and lost[coco80.index("giraffe")] == "background"
    # a target without background: the source background (and any class missing) turns void
    pal = np.zeros((2, 3), dtype=np.uint8)
    nobg = LabelSpace("nobg", ("cat", "dog"), pal, background=None)
    losses = voc.mapping_losses(nobg)
    assert losses[0] == "void" and losses[voc.index("person")] == "void"
    assert voc.index("cat") not in losses and voc.index("dog") not in losses and len(losses) == 19
