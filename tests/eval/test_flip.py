"""Left-right flip test-time augmentation (``flip=True``): the image and its mirror go through ``predict``
as one batch of 2 and the mirror's logits, flipped back, are averaged with the image's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raysemiseg.train.loop import predict_image, predict_logits

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)   # x = pixel / 255
CPU = torch.device("cpu")


class ColumnRamp(nn.Module):
    """Logits that depend on position only: class 0 scores the column index j, class 1 scores 1.5."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        return torch.cat([ramp, torch.full_like(ramp, 1.5)], dim=1)


class FirstChannels(nn.Module):
    """Logits = the first two input channels: a pointwise map, so mirroring commutes with it."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


class Conditioned(nn.Module):
    """Label-conditioned: logits are the given multi-hot, broadcast over the image."""

    def predict(self, x: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
        assert image_labels.shape[0] == x.shape[0]
        return image_labels[:, :, None, None].expand(-1, -1, *x.shape[-2:]).clone()


def _image(h: int = 3, w: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_flip_averages_a_position_dependent_output_hand_checked() -> None:
    plain = predict_logits(ColumnRamp(), _image(), MEAN, STD, CPU)
    flipped = predict_logits(ColumnRamp(), _image(), MEAN, STD, CPU, flip=True)
    assert plain[0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    # column j sees (j + (W - 1 - j)) / 2 = 1.5 for W = 4
    assert flipped[0].flatten().tolist() == [1.5] * 12
    # argmax: plain picks class 1 (1.5) left of the middle and class 0 right of it
    assert predict_image(ColumnRamp(), _image(), MEAN, STD, CPU).label[0].tolist() == [1, 1, 0, 0]


def test_flip_leaves_a_mirror_equivariant_output_unchanged() -> None:
    img = _image()
    plain = predict_logits(FirstChannels(), img, MEAN, STD, CPU)
    assert torch.allclose(plain, torch.from_numpy(img[..., :2]).permute(2, 0, 1).float() / 255.0)
    assert torch.allclose(predict_logits(FirstChannels(), img, MEAN, STD, CPU, flip=True), plain)


def test_flip_passes_the_given_labels_to_both_views() -> None:
    labels = np.array([1.0, 0.0, 1.0], np.float32)
    out = predict_logits(Conditioned(), _image(), MEAN, STD, CPU, image_labels=labels, flip=True)
    assert out.shape == (3, 3, 4) and out[:, 0, 0].tolist() == [1.0, 0.0, 1.0]


def test_flip_is_refused_for_the_cam_classifier_path() -> None:
    class Classifier(ColumnRamp):
        name = "cam_classifier"

        def predict_classes(self, x: torch.Tensor, image_labels: torch.Tensor | None = None):  # never reached
            raise AssertionError

    with pytest.raises(ValueError, match="flip test-time augmentation is not available for 'cam_classifier'"):
        predict_image(Classifier(), _image(), MEAN, STD, CPU, flip=True)
