"""Bbox-Rect / Bbox-Seg tests (Papandreou et al. 2015 Sec. 4.2)."""

from __future__ import annotations

import numpy as np

from raysemiseg.pseudolabel.bbox import BboxSegParams, bbox_rect, bbox_seg, boxes_array


def test_bbox_rect_hand_checked_overlap_goes_to_smallest() -> None:
    boxes = [{"class_id": 3, "x0": 0.0, "y0": 0.0, "x1": 4.0, "y1": 3.0},   # area 12
             {"class_id": 7, "x0": 2.0, "y0": 1.0, "x1": 5.0, "y1": 4.0}]   # area 9 (smaller, on top)
    out = bbox_rect(boxes, 5, 6)
    expect = [[3, 3, 3, 3, 0, 0],
              [3, 3, 7, 7, 7, 0],
              [3, 3, 7, 7, 7, 0],
              [0, 0, 7, 7, 7, 0],
              [0, 0, 0, 0, 0, 0]]
    assert out.tolist() == expect
    assert bbox_rect([], 2, 2, background_id=0).tolist() == [[0, 0], [0, 0]]
    assert boxes_array([(1, 0, 0, 1, 1)]).shape == (1, 5)


def test_bbox_seg_follows_object_inside_box_and_clamps() -> None:
    # a bright disc inside a larger box on a dark background: Bbox-Seg keeps the disc, drops the corners
    h, w = 40, 40
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 10 ** 2
    img = np.where(disc[..., None], 220, 20).astype(np.uint8).repeat(3, 2)
    box = [(15, 8.0, 8.0, 33.0, 33.0)]
    lab, conf = bbox_seg(img, box, BboxSegParams(alpha=0.2))
    rect = bbox_rect(box, h, w)
    assert set(np.unique(lab)) == {0, 15}
    assert (lab[rect == 0] == 0).all()                       # outside the box: background (clamped)
    r = int(round(25 * np.sqrt(0.2) / 2))
    assert (lab[20 - r + 1:20 + r - 1, 20 - r + 1:20 + r - 1] == 15).all()   # centre clamp
    iou_seg = ((lab == 15) & disc).sum() / ((lab == 15) | disc).sum()
    iou_rect = ((rect == 15) & disc).sum() / ((rect == 15) | disc).sum()
    assert iou_seg > 0.9 > iou_rect
    assert conf.shape == (h, w) and np.all(conf[rect == 0] == 1.0)
