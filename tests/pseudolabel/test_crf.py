"""Dense CRF (Krahenbuhl & Koltun 2011) tests: zero pairwise = unary softmax, denoising, clamps."""

from __future__ import annotations

import numpy as np
import pytest

from raysemiseg.pseudolabel.crf import CRFParams, crf_labels, dense_crf, restrict_probs


def _two_region_image(h: int = 24, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 2:] = 255
    gt = np.zeros((h, w), np.int64)
    gt[:, w // 2:] = 1
    return img, gt


def test_zero_pairwise_returns_unary_probabilities() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((3, 5, 7)).astype(np.float32) + 0.05
    p /= p.sum(0, keepdims=True)
    q = dense_crf(np.zeros((5, 7, 3), np.uint8), p, CRFParams(pos_w=0.0, bi_w=0.0))
    np.testing.assert_allclose(q, p, atol=1e-5)  # mean field with no pairwise: Q = softmax(ln P) = P


def test_crf_removes_label_noise_along_colour_edges() -> None:
    img, gt = _two_region_image()
    rng = np.random.default_rng(1)
    noisy = np.where(rng.random(gt.shape) < 0.2, 1 - gt, gt)
    probs = np.stack([np.where(noisy == 0, 0.6, 0.4), np.where(noisy == 1, 0.6, 0.4)]).astype(np.float32)
    assert (noisy != gt).mean() > 0.1
    img.flags.writeable = False  # as decoded by PIL
    lab, conf = crf_labels(img, probs, [0, 7])
    np.testing.assert_array_equal(lab, np.where(gt == 1, 7, 0))  # mapped back to label ids
    assert conf.shape == gt.shape and conf.min() >= 0.5
    lab_half, _ = crf_labels(img, probs, [0, 7], CRFParams(scale=0.5))   # half-resolution inference
    assert (lab_half == np.where(gt == 1, 7, 0)).mean() > 0.95


def test_clamped_pixels_keep_their_label() -> None:
    img, gt = _two_region_image()
    probs = np.full((2,) + gt.shape, 0.5, np.float32)
    clamp = np.full(gt.shape, -1)
    clamp[:, :3] = 0
    clamp[:, -3:] = 1
    clamp[5, 5] = 1  # a clamp against the image evidence still holds
    q = dense_crf(img, probs, clamp=clamp)
    lab = q.argmax(0)
    assert lab[5, 5] == 1 and (lab[:, -3:] == 1).all() and (lab[:, :3][np.arange(24) != 5] == 0).all()
    np.testing.assert_array_equal(lab, np.where(gt == 1, 1, np.where(clamp == 1, 1, 0)))


def test_restrict_probs_renormalises_and_errors() -> None:
    full = np.zeros((21, 2, 2), np.float32)
    full[0], full[3], full[9] = 0.2, 0.2, 0.6
    sub = restrict_probs(full, [0, 3])
    np.testing.assert_allclose(sub, 0.5)
    assert restrict_probs(full, [1, 2]).tolist() == [[[0.5, 0.5]] * 2] * 2  # all-zero rows -> uniform
    with pytest.raises(ValueError, match="probs must be"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="class_ids"):
        crf_labels(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.float32), [0])
