"""Evaluation with the given image labels (TransferNet-GT, Hong et al. 2016 Sec. 4.3): the shared
evaluator passes each row's labels to a label-conditioned method's ``predict``, and refuses methods
that cannot use them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raysemiseg.config import ModelConfig
from raysemiseg.data.schema import encode_image, encode_mask
from raysemiseg.eval.predict import evaluate_rows
from raysemiseg.labels import builtin
from raysemiseg.methods import get_method
from raysemiseg.methods.transfernet import TransferNetParams
from raysemiseg.train.data import multi_hot_labels

SPACE = builtin("voc21")
MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)


def _rows() -> pa.Table:
    rng = np.random.default_rng(0)
    imgs, masks = [], []
    for cls in (3, 12):
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        m = np.zeros((48, 64), np.uint8)
        m[10:30, 10:40] = cls
        imgs.append(encode_image(img, "png"))
        masks.append(encode_mask(m))
    return pa.table({"image_id": ["a", "b"], "image": imgs, "mask": masks,
                     "labels": pa.array([[3], [12]], pa.list_(pa.int32()))})


def test_multi_hot_labels_hand_checked() -> None:
    v = multi_hot_labels([3, 12, 40], 21)          # 40 is outside the space: ignored
    assert v.dtype == np.float32 and v.shape == (21,)
    assert np.flatnonzero(v).tolist() == [0, 3, 12]
    assert np.flatnonzero(multi_hot_labels(None, 5, background_id=None)).tolist() == []


class _Recorder(torch.nn.Module):
    """Records the image labels ``predict`` receives and predicts the first given foreground label
    everywhere (a label-conditioned stand-in whose output is known)."""

    name = "recorder"
    label_conditioned = True
    num_classes = SPACE.num_classes
    label_space = SPACE

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[int]] = []
        self.backbone = torch.nn.Identity()
        self.backbone.mean, self.backbone.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def predict(self, images: torch.Tensor, image_labels: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = images.shape
        out = torch.zeros(n, self.num_classes, h, w)
        assert image_labels is not None
        for i in range(n):
            ids = image_labels[i].nonzero().flatten().tolist()
            self.seen.append(ids)
            out[i, ids[-1]] = 1.0
        return out


def test_given_labels_reach_predict_and_score() -> None:
    m = _Recorder()
    res = evaluate_rows(m, _rows(), SPACE, given_labels=True, progress=False)
    assert m.seen == [[0, 3], [0, 12]]
    # predicting class 3 / 12 over the whole image: IoU of that class = its mask area / image area
    area = 20 * 30 / (48 * 64)
    assert res.metrics.iou[3] == pytest.approx(area) and res.metrics.iou[12] == pytest.approx(area)
    assert res.metrics.iou[0] == pytest.approx(0.0)


def test_transfernet_gt_predicts_only_given_labels_and_other_methods_refuse() -> None:
    torch.manual_seed(0)
    tn = get_method("transfernet")(SPACE, MODEL, TransferNetParams(attention_dim=8, cls_hidden=16, decoder_width=8))
    res = evaluate_rows(tn, _rows(), SPACE, given_labels=True, progress=False, num_samples=2)
    for s, given in zip(res.samples, ([0, 3], [0, 12])):
        assert set(np.unique(s.pred).tolist()) <= set(given)
    so = get_method("strong_only")(SPACE, MODEL)
    with pytest.raises(ValueError, match="'strong_only' does not predict from given image labels"):
        evaluate_rows(so, _rows(), SPACE, given_labels=True, progress=False)
    assert tn.eval_with_given_labels is False
    gt = get_method("transfernet")(SPACE, MODEL, TransferNetParams(attention_dim=8, cls_hidden=16, decoder_width=8,
                                                                    use_gt_labels=True))
    assert gt.eval_with_given_labels is True and so.eval_with_given_labels is False


def test_cross_joint_is_scored_on_voc21() -> None:
    """WSSL Cross-Joint (Papandreou et al. 2015 Sec. 4.5) trains over the VOC + COCO union space and
    reports VOC's 21-class mIoU. A strong_only net whose head predicts the COCO-only class "truck" at
    every pixel, scored against a 32x64 mask that is background left / person right: in the union
    space background, person and truck all have IoU 0; with ``score_space=voc21`` a truck pixel is a
    background prediction, so background IoU = 1024 / (1024 + 1024) = 0.5, person 0, mIoU 0.25."""
    from raysemiseg.methods.wssl.cross import union_label_space

    union = union_label_space(builtin("coco80"), SPACE)
    truck = union.index("truck")
    assert truck >= SPACE.num_classes                  # a COCO-only class, after VOC's ids
    method = get_method("strong_only")(union, MODEL, get_method("strong_only").Params(head_hidden=8))
    head = method.head.fc8
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[truck] = 10.0                        # every pixel "truck"...
    img = np.zeros((32, 64, 3), np.uint8)
    m = np.zeros((32, 64), np.uint8)
    m[:, 32:] = 15                                     # ...the right half is person
    rows = pa.table({"image_id": ["x"], "image": [encode_image(img, "png")], "mask": [encode_mask(m)],
                     "labels": pa.array([[15]], pa.list_(pa.int32()))})
    own = evaluate_rows(method, rows, union, progress=False)
    voc = evaluate_rows(method, rows, union, progress=False, score_space=SPACE)
    assert own.metrics.iou[0] == 0.0 and own.metrics.iou[15] == 0.0 and own.metrics.iou[truck] == 0.0
    assert voc.label_space.num_classes == 21
    assert voc.metrics.iou[0] == pytest.approx(0.5) and voc.metrics.iou[15] == 0.0   # truck -> background
    assert voc.metrics.miou_over([0, 15]) == pytest.approx(0.25)
