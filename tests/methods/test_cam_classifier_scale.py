"""The CAM classifier's dense prediction at K = 21,841 classes: maps over a few candidate classes
only (never (N, K, h, w) at any resolution), equal to ``predict(...).argmax(1)`` when every class is
a candidate, and the shared evaluator's image-level labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from raysemiseg.config import ModelConfig
from raysemiseg.labels import LabelSpace, builtin
from raysemiseg.methods import get_method
from raysemiseg.train.loop import predict_image

MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
K21K = 21_841


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (what gets allocated)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _space(k: int) -> LabelSpace:
    names = ("background",) + tuple(f"c{i:05d}" for i in range(1, k))
    return LabelSpace(f"s{k}", names, np.zeros((k, 3), np.uint8), ignore_index=65535)


def _model(space: LabelSpace, **params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = get_method("cam_classifier")
    m = cls(space, MODEL, cls.Params(**params))
    torch.nn.init.normal_(m.classifier.weight, std=0.5)
    torch.nn.init.normal_(m.classifier.bias, std=0.5)
    return m.eval()


def test_predict_classes_equals_full_argmax_when_every_class_is_a_candidate() -> None:
    space = builtin("voc21")
    m = _model(space)   # predict_top_k 20 = every VOC foreground class
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        full = m.predict(x)
        cand = m.predict_classes(x)
    assert cand.ids.tolist() == list(range(21))
    assert cand.logits.shape == (2, 21, 40, 56)
    torch.testing.assert_close(cand.logits, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(cand.labels(), full.argmax(1))
    # image scores = GAP of the dense classifier map (the classifier is linear)
    torch.testing.assert_close(cand.image_logits, m.class_logits(x)[0], rtol=1e-5, atol=1e-5)
    # given labels: background + exactly the union of the images' labels, ascending
    labels = torch.zeros(2, 21)
    labels[0, [0, 15]] = 1
    labels[1, [3]] = 1
    with torch.no_grad():
        given = m.predict_classes(x, image_labels=labels)
    assert given.ids.tolist() == [0, 3, 15]
    torch.testing.assert_close(given.logits, full[:, [0, 3, 15]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, K\) = \(2, 21\)"):
        m.predict_classes(x, image_labels=labels[:, :5])
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        m.predict_classes(x, top_k=0)


def test_predict_classes_never_builds_a_k_sized_map_at_21841_classes() -> None:
    space = _space(K21K)
    k_fg = K21K - 1
    m = _model(space, predict_top_k=5)
    n, h, w = 2, 64, 48
    x = torch.randn(n, 3, h, w)
    rec = _OutputShapes()
    with torch.no_grad(), rec:
        cand = m.predict_classes(x)
    p = cand.ids.numel()
    assert 1 + 5 <= p <= 1 + n * 5 and cand.ids[0] == 0 and bool((cand.ids[1:] > 0).all())
    assert cand.logits.shape == (n, p, h, w)
    assert cand.image_logits.shape == (n, k_fg)
    assert cand.labels().shape == (n, h, w)
    # no 4-D tensor with a class dimension of the space's size, at any resolution ...
    assert not [s for s in rec.shapes if len(s) == 4 and s[1] >= k_fg], rec.shapes
    # ... and nothing as large as the low-resolution (N, K, h/8, w/8) map, let alone (N, K, H, W)
    biggest = max(int(np.prod(s)) for s in rec.shapes)
    assert biggest < n * K21K * (h // 8) * (w // 8), biggest
    # the tracer does see K-channel maps: the full ``predict`` of a 21-class model builds them
    small = _model(builtin("voc21"))
    rec21 = _OutputShapes()
    with torch.no_grad(), rec21:
        small.predict(x)
    assert (n, 21, h, w) in rec21.shapes

    # the shared evaluator's per-image path goes through predict_classes: P maps, not K
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    rec_img = _OutputShapes()
    with rec_img:
        pred = predict_image(m, img, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    assert pred.scores.shape == (pred.ids.numel(), h, w) and pred.ids.numel() <= 6
    assert pred.label.shape == (h, w) and set(pred.label.unique().tolist()) <= set(pred.ids.tolist())
    assert not [s for s in rec_img.shapes if len(s) >= 3 and s[-3] >= k_fg]
    # present labels = foreground ids whose image logit > 0
    with torch.no_grad():
        x1 = ((torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.25)[None]
        img_logits = m.class_logits(x1)[0][0]
    assert pred.present.tolist() == m.fg_ids[img_logits > 0].tolist()
