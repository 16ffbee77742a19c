"""CAM (Zhou et al. 2016) tests: hand-computed maps, present rows only, and the cam_classifier method."""

from __future__ import annotations

import pytest
import torch

from raysemiseg.config import ModelConfig
from raysemiseg.labels import builtin
from raysemiseg.methods.base import Batch, get_method
from raysemiseg.pseudolabel.cam import class_activation_maps


def test_cam_hand_computed() -> None:
    # 2 channels on a 2x2 grid; M_c = sum_k w_ck f_k, ReLU, / max
    f = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]], [[1.0, 0.0], [3.0, 1.0]]]])
    w = torch.tensor([[1.0, 1.0], [1.0, -2.0], [0.0, 0.0]])
    cams = class_activation_maps(f, w, [[1, 0]], (2, 2), eps=0.0)
    # row 0 of output = class row 1: [[1-2, 2-0], [0-6, 4-2]] = [[-1, 2], [-6, 2]] -> relu / 2
    torch.testing.assert_close(cams[0][0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    # class row 0: [[2, 2], [3, 5]] / 5
    torch.testing.assert_close(cams[0][1], torch.tensor([[0.4, 0.4], [0.6, 1.0]]))
    up = class_activation_maps(f, w, [[0]], (8, 6))[0]
    assert up.shape == (1, 8, 6) and float(up.max()) == pytest.approx(1.0, abs=1e-4) and float(up.min()) >= 0
    assert class_activation_maps(f, w, [[]], (3, 3))[0].shape == (0, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        class_activation_maps(f, w, [[3]], (2, 2))


def test_cam_classifier_trains_and_gives_cams() -> None:
    torch.manual_seed(0)
    space = builtin("voc21")
    cls = get_method("cam_classifier")
    m = cls(space, ModelConfig(backbone="tiny", pretrained=False))
    n = 4
    labels = torch.zeros(n, 21)
    labels[:, 0] = 1
    labels[[0, 1], 8] = 1
    labels[[2, 3], 12] = 1
    images = torch.randn(n, 3, 32, 32)
    images[:2, 0] += 2.0  # class 8 images differ in the red channel
    batch = Batch(images=images, masks=torch.full((n, 32, 32), 255), pseudo=torch.full((n, 32, 32), 255),
                  image_labels=labels, is_strong=torch.zeros(n, dtype=torch.bool))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = m.compute_losses(batch)["bce"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    m.eval()
    assert m.predict(images).shape == (n, 21, 32, 32)
    cams = m.cams(images[:1], [[8, 12]], out_size=(20, 24))
    assert cams[0].shape == (2, 20, 24) and float(cams[0].min()) >= 0 and float(cams[0].max()) <= 1
    assert m.rows_of([1, 20]).tolist() == [0, 19]
    with pytest.raises(ValueError, match="non-foreground"):
        m.rows_of([0])
