"""Bbox-Rect / Bbox-Seg tests (Papandreou et al. 2015 Sec. 3.3 / 4.4)."""

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


def test_bbox_seg_follows_object_inside_box() -> None:
    # a bright disc inside a larger box on a dark background: Bbox-Seg keeps the disc, drops the corners
    h, w = 40, 40
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 10 ** 2
    img = np.where(disc[..., None], 220, 20).astype(np.uint8).repeat(3, 2)
    box = [(15, 8.0, 8.0, 33.0, 33.0)]
    lab, conf = bbox_seg(img, box, BboxSegParams(alpha=0.2))
    rect = bbox_rect(box, h, w)
    assert set(np.unique(lab)) == {0, 15}
    assert (lab[rect == 0] == 0).all()
    iou_seg = ((lab == 15) & disc).sum() / ((lab == 15) | disc).sum()
    iou_rect = ((rect == 15) & disc).sum() / ((rect == 15) | disc).sum()
    assert iou_seg > 0.9 > iou_rect
    assert conf.shape == (h, w) and np.all(conf[rect == 0] == 1.0)


def test_bbox_seg_clamps_the_central_alpha_area_smallest_box_first() -> None:
    """Bbox-Seg (Papandreou et al. 2015 Sec. 3.3 / 4.4): the centre of each box covering alpha of
    its AREA (sides x sqrt(alpha)) is clamped to the box's class, the smaller box's core winning
    where cores overlap; pixels outside every box are background. On a featureless grey image with
    fg_prior 0.3 (free in-box pixels: background 0.7) nothing but the clamps can make foreground.

    Boxes: class 15 on [8, 32)^2 (24 px sides), class 7 on [16, 28)^2 (12 px), alpha = 0.25 ->
    sqrt = 0.5: cores [14, 26)^2 (144 px) and [19, 25)^2 (36 px, class 7 on top). Expected labels:
    7 on the small core, 15 on the rest of the big core (108 px), background elsewhere; the CRF
    marginal is exactly 1 at clamped pixels (cores and outside) and below 1 at free ones.
    (alpha on the side would give cores of 6 and 3 px; no clamp, no foreground at all.)"""
    h = w = 40
    img = np.full((h, w, 3), 128, np.uint8)
    boxes = [(15, 8.0, 8.0, 32.0, 32.0), (7, 16.0, 16.0, 28.0, 28.0)]
    lab, conf = bbox_seg(img, boxes, BboxSegParams(alpha=0.25, fg_prior=0.3))
    expect = np.zeros((h, w), np.int64)
    expect[14:26, 14:26] = 15
    expect[19:25, 19:25] = 7
    assert lab.tolist() == expect.tolist()
    clamped = (expect > 0) | (bbox_rect(boxes, h, w) == 0)
    assert np.array_equal(conf == 1.0, clamped)
