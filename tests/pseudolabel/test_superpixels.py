"""Superpixel self-diffusion tests (Xiao et al. 2018 Eq. 2 + harmonic solution on tiny graphs)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2lab

from raysemiseg.pseudolabel.superpixels import (
    DiffusionParams, harmonic_solution, region_adjacency, self_diffusion, slic_superpixels,
    superpixel_affinity, superpixel_means,
)


def test_region_adjacency_hand_built() -> None:
    seg = np.array([[0, 0, 1], [2, 2, 1], [2, 3, 3]])
    assert region_adjacency(seg).tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]


def test_affinity_eq2() -> None:
    f = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    z = superpixel_affinity(f, np.array([[0, 1]]), sigma=1.0)
    assert z[0] == pytest.approx(np.exp(-5.0 / 2.0))


def test_harmonic_path_graph_closed_form() -> None:
    # 0 -1- 1 -2- 2 -4- 3 with q0 = 1, q3 = 0: a resistor chain (R = 1/z): q1 = 1 - 1/1.75, q2 = 0.25/1.75
    edges = np.array([[0, 1], [1, 2], [2, 3]])
    q = harmonic_solution(4, edges, np.array([1.0, 2.0, 4.0]), np.array([1, 0, 0, 1], bool),
                          np.array([1.0, 0, 0, 0]))
    np.testing.assert_allclose(q, [1.0, 1 - 1 / 1.75, 0.25 / 1.75, 0.0], atol=1e-5)


def test_harmonic_symmetric_graph_and_unseeded_component() -> None:
    # 0 fixed 1, 3 fixed 0, 1 and 2 free and symmetric: q1 = (1 + q2 + 0) / 3 = q2 -> 0.5; node 4 isolated -> 0
    edges = np.array([[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]])
    fixed = np.array([1, 0, 0, 1, 0], bool)
    q = harmonic_solution(5, edges, np.ones(5), fixed, np.array([1.0, 0, 0, 0, 0]))
    np.testing.assert_allclose(q, [1.0, 0.5, 0.5, 0.0, 0.0], atol=1e-5)


def test_self_diffusion_on_four_block_strip() -> None:
    # four 4x4 blocks left to right: red, red, blue, blue; CAM 0.9, 0.3, 0.3, 0.0
    red, blue = np.array([200, 30, 30], np.uint8), np.array([30, 30, 200], np.uint8)
    img = np.zeros((4, 16, 3), np.uint8)
    seg = np.repeat(np.arange(4), 4)[None].repeat(4, 0)
    cam = np.zeros((1, 4, 16), np.float32)
    for b, (col, v) in enumerate([(red, 0.9), (red, 0.3), (blue, 0.3), (blue, 0.0)]):
        img[:, 4 * b:4 * b + 4] = col
        cam[0, :, 4 * b:4 * b + 4] = v
    params = DiffusionParams(sigma=3.0, seed_threshold=0.6, bg_seed_threshold=0.1, bg_threshold=0.5)
    labels, q = self_diffusion(img, cam, [12], background_id=0, params=params, segments=seg)
    # closed form: chain 0-1-2-3 with z01 = z23 = 1 and z12 = exp(-||lab(red)-lab(blue)|| / 18)
    lr, lb = rgb2lab(red[None, None])[0, 0], rgb2lab(blue[None, None])[0, 0]
    z12 = np.exp(-np.linalg.norm(lr - lb) / 18.0)
    tot = 2.0 + 1.0 / z12
    np.testing.assert_allclose(q[1, 0, ::4], [1.0, 1 - 1 / tot, 1 / tot, 0.0], atol=1e-4)
    np.testing.assert_allclose(q[0], 1 - q[1], atol=1e-6)
    assert labels[0].tolist() == [12] * 8 + [0] * 8


def test_slic_and_means_on_real_image() -> None:
    from skimage import data

    img = data.astronaut()[::4, ::4]
    seg = slic_superpixels(img, n_segments=50, scale=0.5)
    assert seg.shape == img.shape[:2] and seg.min() == 0
    assert set(np.unique(seg)) == set(range(seg.max() + 1))
    m = superpixel_means(seg, img.astype(float))
    assert m.shape == (seg.max() + 1, 3)
    assert np.allclose(m[0], img[seg == 0].mean(0))
