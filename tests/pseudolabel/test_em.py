"""E-step tests (Papandreou et al. 2015 Alg. 1, Sec. 3.2): hand-computed EM-Fixed, EM-Adapt targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysemiseg.pseudolabel.em import EStepParams, adaptive_biases, e_step, e_step_present, em_adapt, em_fixed


def _scores_2x3() -> torch.Tensor:
    bg = [[1.0, 0.0, 4.0], [2.5, 2.0, 0.0]]
    c1 = [[0.0, 0.0, 0.0], [0.0, 1.0, 3.0]]
    c2 = [[6.0, 0.0, 0.0], [0.0, 0.0, 9.0]]  # absent class (z_2 = 0)
    return torch.tensor([[bg, c1, c2]])


def test_em_fixed_hand_computed_2x3() -> None:
    """EM-Fixed (Papandreou et al. 2015 Sec. 3.2, Eq. 10): f^(l) = f(l) + phi(l, z) with
    phi = b_bg for the background, b_fg for present foreground classes and 0 for ABSENT classes
    (z_l = 0): absent classes keep their raw score and may still win.

    bg + b_bg(3) = [[4, 3, 7], [5.5, 5, 3]];  c1 + b_fg(5) = [[5, 5, 5], [5, 6, 8]];
    c2 (absent, + 0) = [[6, 0, 0], [0, 0, 9]]  ->  argmax [[2, 1, 0], [0, 1, 2]].
    With ``suppress_absent`` (EM-Adapt's "no pixel to an absent class", kept as an option) c2 is
    out of the argmax: [[1, 1, 0], [0, 1, 1]]."""
    present = torch.tensor([[True, True, False]])
    out = em_fixed(_scores_2x3(), present, b_fg=5.0, b_bg=3.0)
    assert out.tolist() == [[[2, 1, 0], [0, 1, 2]]]
    assert EStepParams().suppress_absent is None and not EStepParams().absent_suppressed
    sup = em_fixed(_scores_2x3(), present, b_fg=5.0, b_bg=3.0, suppress_absent=True)
    assert sup.tolist() == [[[1, 1, 0], [0, 1, 1]]]
    # with zero biases the plain argmax over all classes decides (absent c2 included)
    out0 = em_fixed(_scores_2x3(), present, b_fg=0.0, b_bg=0.0, suppress_absent=True)
    assert out0.tolist() == [[[0, 0, 0], [0, 0, 1]]]
    assert em_fixed(_scores_2x3(), present, b_fg=0.0, b_bg=0.0).tolist() == [[[2, 0, 0], [0, 0, 2]]]


def test_em_fixed_region_sends_outside_to_background() -> None:
    """Bbox-EM-Fixed (Sec. 3.3): foreground classes only inside the box region, background outside.
    Inside, c1 + 5 = [5, 5 | 6, 8] vs bg + 3 = [3, 7 | 5, 3] and the absent c2 (unbiased) = [0, 0 | 0, 9]."""
    present = torch.tensor([[True, True, False]])
    region = torch.tensor([[[False, True, True], [False, True, True]]])
    out = em_fixed(_scores_2x3(), present, region=region)
    assert out.tolist() == [[[0, 1, 0], [0, 1, 2]]]
    assert em_fixed(_scores_2x3(), present, region=region, suppress_absent=True).tolist() == [[[0, 1, 0], [0, 1, 1]]]


def test_em_adapt_hand_computed_1x10() -> None:
    # bg scores 0, fg scores 1..10: fg wins everywhere before biasing. rho_bg = 0.4 -> k = 4: the
    # background bias is the 4th smallest margin (4) + eps, so bg wins exactly pixels 1..4.
    fg = torch.arange(1, 11, dtype=torch.float32)
    scores = torch.stack([torch.zeros(10), fg]).reshape(1, 2, 1, 10)
    b = adaptive_biases(scores.reshape(2, 10), torch.tensor([True, False]), rho_fg=0.2, rho_bg=0.4)
    assert b[0].item() == pytest.approx(4.0, abs=1e-2) and b[1].item() == 0.0
    out = em_adapt(scores, torch.tensor([[True, True]]), rho_fg=0.2, rho_bg=0.4)
    assert out.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_em_adapt_rho_per_present_class_hand_computed_1x10() -> None:
    """EM-Adapt (Sec. 3.2): "at least a rho_l portion of the image area is assigned to class l if
    z_l = 1" with rho_l = rho_fg for EVERY present foreground class (DeepLab's
    AdaptiveBiasChannelLayer gives fg_portion to each), and no pixel to an absent class.

    1 x 10 image, bg = 0, c1 = -(j + 1), c2 = -(10 - j), c3 absent = +50. rho_fg = 0.2, rho_bg = 0.4.
    Background wins all 10 pixels (>= 4) before biasing. Default ``fg_share="per_class"``: each fg
    class needs ceil(0.2 * 10) = 2 pixels; c1's margins to bg are j + 1, so b_1 = 2 + eps and c1 wins
    pixels 0, 1; symmetrically c2 wins 8, 9. ``fg_share="total"`` (0.2 / 2 = 0.1 each, 1 pixel):
    c1 wins pixel 0 and c2 pixel 9 only."""
    j = torch.arange(10, dtype=torch.float32)
    scores = torch.stack([torch.zeros(10), -(j + 1), -(10 - j), torch.full((10,), 50.0)]).reshape(1, 4, 1, 10)
    present = torch.tensor([[True, True, True, False]])
    assert EStepParams().fg_share == "per_class"
    out = em_adapt(scores, present, rho_fg=0.2, rho_bg=0.4)
    assert out.flatten().tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 2, 2]
    tot = e_step(scores, present, EStepParams(mode="adapt", fg_share="total"))
    assert tot.flatten().tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    b = adaptive_biases(scores[0, :3].reshape(3, 10), torch.tensor([True, False, False]), 0.2, 0.4)
    assert b.tolist() == pytest.approx([0.0, 2.0, 2.0], abs=1e-2)
    # EM-Adapt keeps suppressing absent classes by default (c3 = +50 never wins) ...
    assert EStepParams(mode="adapt").absent_suppressed
    # ... and with ``suppress_absent=False`` an absent class competes unbiased. c3 = +50 on pixels
    # 0..4 and -50 on 5..9, rho_bg = 0: c1's margins to max(bg, c2, c3) are 51..55 then 6..10, so
    # b_1 = 7 + eps (pixels 5, 6); c2's margins on 7, 8, 9 are then 3, 2, 1, so b_2 = 2 + eps (8, 9).
    s2 = scores.clone()
    s2[0, 3, 0] = torch.tensor([50.0] * 5 + [-50.0] * 5)
    free = e_step(s2, present, EStepParams(mode="adapt", rho_bg=0.0, suppress_absent=False))
    assert free.flatten().tolist() == [3, 3, 3, 3, 3, 1, 1, 0, 2, 2]
    sup = e_step(s2, present, EStepParams(mode="adapt", rho_bg=0.0))
    assert sup.flatten().tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 2, 2]


@pytest.mark.parametrize("fg_share", ["total", "per_class"])
def test_em_adapt_reaches_rho_targets(fg_share: str) -> None:
    g = torch.Generator().manual_seed(0)
    n, k, h, w = 2, 5, 20, 30
    scores = torch.randn(n, k, h, w, generator=g)
    scores[:, 1] += 6.0  # class 1 dominates everywhere; classes 2, 3 rarely win; bg never
    scores[:, 0] -= 4.0
    present = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    params = EStepParams(mode="adapt", rho_fg=0.2, rho_bg=0.4, fg_share=fg_share)  # type: ignore[arg-type]
    out = e_step(scores, present, params)
    s = h * w
    for i in range(n):
        frac = torch.bincount(out[i].flatten(), minlength=k).float() / s
        fg_ids = [c for c in range(1, k) if present[i, c]]
        assert frac[0] >= 0.4 - 1e-9
        assert frac[fg_ids].sum() >= 0.2 - 1e-9
        per = 0.2 / len(fg_ids) if fg_share == "total" else 0.2
        assert all(frac[c] >= per - 1e-9 for c in fg_ids)
        absent = [c for c in range(k) if not present[i, c] and c != 0]
        assert frac[absent].sum() == 0


def test_padding_is_not_labelled_and_not_counted_by_em_adapt() -> None:
    """E-step on a padded crop: only the image's own pixels are labelled (padding -> ignore) and
    EM-Adapt's "rho_l of the image area" (Sec. 3.2) counts image pixels only.

    1 x 10 crop, pixels 5..9 padding. bg = 0; class 1 = -(j + 1) on the image and +10 on the
    padding. Counting the padding (S = 10) class 1 already wins 5 >= ceil(0.2 * 10) pixels and gets
    no bias. Over the S = 5 image pixels it needs ceil(0.2 * 5) = 1: b_1 = 1 + eps, pixel 0; the
    background keeps 4 >= ceil(0.4 * 5) = 2."""
    j = torch.arange(10, dtype=torch.float32)
    fg = torch.where(j < 5, -(j + 1), torch.full_like(j, 10.0))
    scores = torch.stack([torch.zeros(10), fg]).reshape(1, 2, 1, 10)
    valid = (j < 5).reshape(1, 1, 10)
    out = em_adapt(scores, torch.tensor([[True, True]]), rho_fg=0.2, rho_bg=0.4, valid=valid)
    assert out.flatten().tolist() == [1, 0, 0, 0, 0] + [255] * 5
    fixed = em_fixed(scores, torch.tensor([[True, True]]), valid=valid, ignore_index=99)
    assert fixed.flatten().tolist()[5:] == [99] * 5
    with pytest.raises(ValueError, match="valid"):
        em_fixed(scores, torch.tensor([[True, True]]), valid=valid[0])


def test_present_layout_matches_full_layout_and_large_space() -> None:
    g = torch.Generator().manual_seed(1)
    k = 21
    scores = torch.randn(1, k, 8, 9, generator=g)
    present = torch.zeros(1, k, dtype=torch.bool)
    ids = [0, 4, 15]
    present[0, ids] = True
    for mode in ("fixed", "adapt"):
        # the present layout holds only present classes: it is the absent-suppressed E-step
        p = EStepParams(mode=mode, suppress_absent=True)  # type: ignore[arg-type]
        full = e_step(scores, present, p)[0].numpy()
        comp = e_step_present(scores[0, ids].numpy(), np.array(ids), p, background_id=0)
        assert isinstance(comp, np.ndarray) and comp.dtype == np.int64
        np.testing.assert_array_equal(full, comp)
    # ids from a 21,841-class space: only the P rows are touched
    big_ids = np.array([0, 9000, 21840])
    lab = e_step_present(scores[0, :3].numpy(), big_ids, EStepParams(suppress_absent=True), background_id=0)
    assert set(np.unique(lab)) <= set(big_ids.tolist())
    # EM-Fixed with absent classes unbiased (Eq. 10) needs the absent classes' scores: refused here
    with pytest.raises(ValueError, match="suppress_absent"):
        e_step_present(scores[0, :3].numpy(), big_ids, EStepParams(), background_id=0)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="present must be"):
        e_step(torch.zeros(1, 3, 2, 2), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="background id"):
        e_step_present(np.zeros((2, 2, 2), np.float32), [1, 2], background_id=0)
    for share in ("total", "per_class"):   # one present fg class must be able to meet both targets
        with pytest.raises(ValueError, match="rho_fg"):
            EStepParams(mode="adapt", rho_fg=0.7, rho_bg=0.5, fg_share=share)  # type: ignore[arg-type]
