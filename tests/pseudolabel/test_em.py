"""E-step tests (Papandreou et al. 2015 Alg. 1, Sec. 3.2): hand-computed EM-Fixed, EM-Adapt targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysemiseg.pseudolabel.em import EStepParams, adaptive_biases, e_step, e_step_present, em_adapt, em_fixed


def _scores_2x3() -> torch.Tensor:
    bg = [[1.0, 0.0, 4.0], [2.5, 2.0, 0.0]]
    c1 = [[0.0, 0.0, 0.0], [0.0, 1.0, 3.0]]
    c2 = [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]  # absent class: must be suppressed despite high scores
    return torch.tensor([[bg, c1, c2]])


def test_em_fixed_hand_computed_2x3() -> None:
    # bg + b_bg(3) = [[4,3,7],[5.5,5,3]];  c1 + b_fg(5) = [[5,5,5],[5,6,8]];  c2 absent.
    present = torch.tensor([[True, True, False]])
    out = em_fixed(_scores_2x3(), present, b_fg=5.0, b_bg=3.0)
    assert out.tolist() == [[[1, 1, 0], [0, 1, 1]]]
    # with equal biases the plain argmax over present classes decides: bg wins where bg > c1
    out0 = em_fixed(_scores_2x3(), present, b_fg=0.0, b_bg=0.0)
    assert out0.tolist() == [[[0, 0, 0], [0, 0, 1]]]


def test_em_fixed_region_sends_outside_to_background() -> None:
    present = torch.tensor([[True, True, False]])
    region = torch.tensor([[[False, True, True], [False, True, True]]])
    out = em_fixed(_scores_2x3(), present, region=region)
    assert out.tolist() == [[[0, 1, 0], [0, 1, 1]]]


def test_em_adapt_hand_computed_1x10() -> None:
    # bg scores 0, fg scores 1..10: fg wins everywhere before biasing. rho_bg = 0.4 -> k = 4: the
    # background bias is the 4th smallest margin (4) + eps, so bg wins exactly pixels 1..4.
    fg = torch.arange(1, 11, dtype=torch.float32)
    scores = torch.stack([torch.zeros(10), fg]).reshape(1, 2, 1, 10)
    b = adaptive_biases(scores.reshape(2, 10), torch.tensor([True, False]), rho_fg=0.2, rho_bg=0.4)
    assert b[0].item() == pytest.approx(4.0, abs=1e-2) and b[1].item() == 0.0
    out = em_adapt(scores, torch.tensor([[True, True]]), rho_fg=0.2, rho_bg=0.4)
    assert out.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


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


def test_present_layout_matches_full_layout_and_large_space() -> None:
    g = torch.Generator().manual_seed(1)
    k = 21
    scores = torch.randn(1, k, 8, 9, generator=g)
    present = torch.zeros(1, k, dtype=torch.bool)
    ids = [0, 4, 15]
    present[0, ids] = True
    for mode in ("fixed", "adapt"):
        p = EStepParams(mode=mode)  # type: ignore[arg-type]
        full = e_step(scores, present, p)[0].numpy()
        comp = e_step_present(scores[0, ids].numpy(), np.array(ids), p, background_id=0)
        assert isinstance(comp, np.ndarray) and comp.dtype == np.int64
        np.testing.assert_array_equal(full, comp)
    # ids from a 21,841-class space: only the P rows are touched
    big_ids = np.array([0, 9000, 21840])
    lab = e_step_present(scores[0, :3].numpy(), big_ids, EStepParams(), background_id=0)
    assert set(np.unique(lab)) <= set(big_ids.tolist())


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="present must be"):
        e_step(torch.zeros(1, 3, 2, 2), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="background id"):
        e_step_present(np.zeros((2, 2, 2), np.float32), [1, 2], background_id=0)
    with pytest.raises(ValueError):
        EStepParams(mode="adapt", rho_fg=0.7, rho_bg=0.5)
