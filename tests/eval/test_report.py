"""Eval reports: colours, overlays grid, bar chart, files; CRF refinement through the one CRF."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from raysemiseg.eval.metrics import compute_metrics
from raysemiseg.eval.predict import EvalResult, Sample, refine_with_crf
from raysemiseg.eval.report import blend, colorize, overlay_grid, write_report
from raysemiseg.labels import builtin

SPACE = builtin("voc21")


def _result(samples: int = 2) -> EvalResult:
    conf = np.zeros((21, 21), np.int64)
    conf[0, 0], conf[0, 15], conf[15, 15] = 40, 10, 10      # bg IoU 40/50, person 10/20
    img = np.full((10, 20, 3), 100, np.uint8)
    gt = np.zeros((10, 20), np.int64)
    gt[:, 10:] = 15
    gt[0, 0] = 255
    pred = np.zeros((10, 20), np.int64)
    pred[:, 5:] = 15
    return EvalResult(compute_metrics(conf), SPACE, samples, 0.5, False,
                      [Sample(f"img{i}", img, gt, pred) for i in range(samples)])


def test_colorize_and_blend_hand_checked() -> None:
    m = np.array([[0, 15, 255]])
    c = colorize(m, SPACE)
    assert c[0, 0].tolist() == [0, 0, 0] and c[0, 1].tolist() == SPACE.palette[15].tolist()
    assert c[0, 2].tolist() == [255, 255, 255]
    img = np.full((1, 3, 3), 200, np.uint8)
    b = blend(img, m, SPACE, alpha=0.5)
    assert b[0, 0].tolist() == [200, 200, 200]            # background keeps the image
    assert b[0, 1].tolist() == ((200 + SPACE.palette[15].astype(float)) / 2).astype(np.uint8).tolist()
    assert b[0, 2].tolist() == [200, 200, 200]            # ignore keeps the image


def test_overlay_grid_layout() -> None:
    grid = overlay_grid(_result(3).samples, SPACE, tile=50)
    # 3 cells of 100 x 50 (aspect 2:1) + gaps; header 18 px + 3 rows of 54
    assert grid.size == (3 * 100 + 8, 18 + 3 * 54)


def test_write_report_files(tmp_path) -> None:
    rep = write_report(_result(), tmp_path / "r", title="val", compare={"other": _result()})
    names = sorted(p.name for p in rep.files)
    assert names == ["iou_bar.png", "iou_table.txt", "metrics.json", "overlays.png"]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert abs(m["miou"] - (0.8 + 0.5) / 2) < 1e-9 and m["iou"]["person"] == 0.5 and m["iou"]["cat"] is None
    assert "person" in rep.table and Image.open(tmp_path / "r" / "iou_bar.png").size[0] > 100


def test_crf_refinement_uses_predicted_labels_only() -> None:
    img = np.zeros((12, 12, 3), np.uint8)
    img[:, 6:] = 255
    logits = torch.zeros(21, 12, 12)
    logits[15, :, 6:] = 3.0          # person on the bright half
    logits[0, :, :6] = 3.0           # background on the dark half
    logits[7, 0, 0] = 2.0            # a weak 'car' score never argmax: not offered to the CRF
    lab = refine_with_crf(img, logits, background_id=0)
    assert set(np.unique(lab).tolist()) <= {0, 15}
    assert (lab[:, 8:] == 15).all() and (lab[:, :4] == 0).all()
    one = torch.zeros(21, 4, 4)
    one[0] = 5.0
    assert (refine_with_crf(np.zeros((4, 4, 3), np.uint8), one, 0) == 0).all()
