"""The E-step of weakly-supervised EM (Papandreou et al., ICCV 2015, Alg. 1 and Sec. 3.2).

This module is the single implementation of the E-step. Offline pseudo-labelling
(``raysemiseg pseudolabel`` with ``em_fixed.yaml`` / ``em_adapt_crf.yaml``) and online WSSL training
(``methods/wssl``) both call :func:`e_step` (torch, any device) or its present-labels wrapper
:func:`e_step_present` (numpy or torch).

The paper's E-step (Alg. 1) with image-level labels ``z``::

    f^_m(l) = f_m(l | x; theta') + ln P(y_m = l | z)
    y^_m    = argmax_l f^_m(l)

where ``f_m`` are the network's per-pixel class scores (logits or log-probabilities: the argmax is
invariant to a per-pixel shift, so both give the same labels) and ``ln P(y_m = l | z)`` is a per-class
bias:

* **EM-Fixed** (Sec. 3.2, Eq. 10): ``b_l = b_fg`` for present foreground classes, ``b_l = b_bg`` for
  the background and ``b_l = 0`` for ABSENT classes (phi(y_m = l, z) = 0 when z_l = 0): absent
  classes keep their raw score and can still win a pixel, as in DeepLab's ``BiasChannelLayer``.
  Paper defaults ``b_fg = 5``, ``b_bg = 3``. ``suppress_absent=True`` takes absent classes out of
  the argmax instead (an option, not the paper's EM-Fixed).
* **EM-Adapt** (Sec. 3.2): per image, biases chosen so that at least ``rho_l`` of the image area
  goes to each present class l (``rho_bg`` for the background, ``rho_fg`` for EACH present
  foreground class) and no pixel to an absent class (``suppress_absent`` defaults to True here).
  Paper defaults ``rho_fg = 0.20``, ``rho_bg = 0.40``.

EM-Adapt rule implemented here (DeepLab's adaptive-bias channel layer, made exact): for every present
class ``c`` the *score margin* ``d_c(m) = max_{l present} f^_m(l) - f^_m(c) >= 0`` is computed; with
target fraction ``t_c`` the bias of ``c`` is raised by the ``k``-th smallest margin,
``k = ceil(t_c * S)`` (``S`` = valid pixels of the image), plus a tie-breaking epsilon, so that
``c`` then wins on at least ``k`` pixels. Targets (``fg_share``): ``t_bg = rho_bg`` for the
background and, by default (``"per_class"``, the paper's "rho_l of the image area to class l" and
DeepLab's ``AdaptiveBiasChannelLayer``, which gives ``fg_portion`` to each present fg class),
``t_c = rho_fg`` for each present foreground class; with ``n_fg * rho_fg + rho_bg > 1`` the targets
of an image cannot all hold and the sweeps stop after ``num_iter`` (as in DeepLab, where the last
raised class wins the contested pixels). ``fg_share="total"`` (a project variant) gives each of the
``n_fg`` classes ``rho_fg / n_fg`` instead. The background is visited first, then the foreground
classes in ascending id order, and the sweep is repeated until every target holds or ``num_iter``
sweeps were made (biases only grow, so one class's raise can take pixels from another; the repeats
fix that). The biases found are returned by :func:`adaptive_biases`.

Valid pixels: ``valid`` marks the image's own pixels; padding added by the training crop is
invalid. Invalid pixels get ``ignore_index``, are left out of EM-Adapt's pixel count ``S`` (its
"image area") and never enter the biases.

Region (Bbox-EM-Fixed, Sec. 3.3): with ``region`` given, every non-background class is allowed (and
biased) only inside the region (a (H, W) mask of "inside any box", or a per-class (K, H, W) mask
"inside a box of class k"); outside, those classes are out of the argmax, so pixels outside every
allowed region go to the background.

Nothing here costs O(size of the label space) per image beyond the score tensor the caller passes:
with the present-labels layout (``(P, H, W)`` scores + their class ids) every operation is over the
P present classes only, so a 21,841-class space costs the same as a 21-class one.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

__all__ = [
    "EStepParams",
    "adaptive_biases",
    "e_step",
    "e_step_present",
    "em_adapt",
    "em_fixed",
]

#: added to the k-th margin so the raised class wins ties (argmax takes the first maximum)
_TIE_EPS = 1e-4


class EStepParams(BaseModel):
    """Parameters of the E-step (Papandreou et al. 2015 Sec. 3.2 defaults).

    Attributes:
        mode: ``"fixed"`` (EM-Fixed) or ``"adapt"`` (EM-Adapt).
        b_fg: EM-Fixed bias added to present foreground classes' scores (score units).
        b_bg: EM-Fixed bias added to the background score.
        rho_fg: EM-Adapt minimum fraction of pixels given to present foreground classes, in [0, 1].
        rho_bg: EM-Adapt minimum fraction of pixels given to the background, in [0, 1].
        fg_share: ``"per_class"`` (default, Sec. 3.2 and DeepLab's layer): each present
            foreground class gets at least ``rho_fg``; ``"total"``: the foreground classes share
            ``rho_fg`` (``rho_fg / n_fg`` each).
        suppress_absent: take classes with ``z_l = 0`` out of the argmax. ``None`` (default) = the
            paper's rule for the mode: False for EM-Fixed (Eq. 10: absent classes unbiased, they
            may win), True for EM-Adapt ("no pixel assigned to class l if z_l = 0").
        num_iter: maximum EM-Adapt sweeps over the present classes.

    Raises:
        ValueError: EM-Adapt with ``rho_fg + rho_bg > 1`` (not even one foreground class could
            meet its target next to the background's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["fixed", "adapt"] = "fixed"
    b_fg: float = 5.0
    b_bg: float = 3.0
    rho_fg: float = Field(0.20, ge=0.0, le=1.0)
    rho_bg: float = Field(0.40, ge=0.0, le=1.0)
    fg_share: Literal["total", "per_class"] = "per_class"
    suppress_absent: bool | None = None
    num_iter: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _feasible(self) -> "EStepParams":
        if self.mode == "adapt" and self.rho_fg + self.rho_bg > 1.0 + 1e-9:
            raise ValueError(f"EM-Adapt: rho_fg + rho_bg must be <= 1, got {self.rho_fg} + {self.rho_bg}")
        return self

    @property
    def absent_suppressed(self) -> bool:
        """Whether absent classes are out of the argmax (``suppress_absent`` or the mode's rule)."""
        if self.suppress_absent is not None:
            return self.suppress_absent
        return self.mode == "adapt"


def _check_scores(scores: Tensor, present: Tensor) -> None:
    if scores.ndim != 4:
        raise ValueError(f"scores must be (N, K, H, W), got shape {tuple(scores.shape)}")
    n, k = scores.shape[:2]
    if present.shape != (n, k):
        raise ValueError(f"present must be (N, K) = ({n}, {k}) bool, got shape {tuple(present.shape)}")


def adaptive_biases(
    scores: Tensor,
    is_bg: Tensor,
    rho_fg: float = 0.20,
    rho_bg: float = 0.40,
    fg_share: Literal["total", "per_class"] = "per_class",
    num_iter: int = 10,
    is_present: Tensor | None = None,
) -> Tensor:
    """EM-Adapt biases of ONE image over its classes (rule in the module docstring).

    Args:
        scores: (P, S) float scores of the P candidate classes (background included when present)
            at S pixels (any device).
        is_bg: (P,) bool, True for the background row (at most one).
        rho_fg: minimum fraction of the S pixels per present foreground class (see ``fg_share``).
        rho_bg: minimum fraction of the S pixels for the background.
        fg_share: ``"per_class"`` (each present fg class targets ``rho_fg``) or ``"total"``
            (each targets ``rho_fg / n_fg``).
        num_iter: maximum sweeps.
        is_present: (P,) bool, default all True: rows with False are absent classes that only
            compete (target 0, bias 0; ``suppress_absent=False``).

    Returns:
        (P,) float biases (>= 0) on the scores' device; ``argmax(scores + biases[:, None])`` then
        gives the background >= ceil(rho_bg * S) pixels and each present foreground class >= its
        target (when the targets sum to <= 1; otherwise as close as ``num_iter`` sweeps get).

    Raises:
        ValueError: on shape mismatch.
    """
    if scores.ndim != 2 or is_bg.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (P, S) and is_bg (P,), got {tuple(scores.shape)}, {tuple(is_bg.shape)}")
    p, s = scores.shape
    biases = torch.zeros(p, dtype=scores.dtype, device=scores.device)
    if p <= 1 or s == 0:
        return biases
    is_bg = is_bg.to(torch.bool)
    present = torch.ones(p, dtype=torch.bool) if is_present is None else is_present.to("cpu", torch.bool)
    if present.shape != (p,):
        raise ValueError(f"is_present must be (P,) = ({p},), got {tuple(present.shape)}")
    fg_rows = [i for i in range(p) if not bool(is_bg[i]) and bool(present[i])]
    fg_target = rho_fg / max(len(fg_rows), 1) if fg_share == "total" else rho_fg
    targets = [rho_bg if bool(is_bg[i]) else (fg_target if i in fg_rows else 0.0) for i in range(p)]
    ks = [min(s, max(0, math.ceil(t * s - 1e-9))) for t in targets]
    order = sorted(range(p), key=lambda i: (not bool(is_bg[i]), i))  # background first
    for _ in range(num_iter):
        changed = False
        for c in order:
            k = ks[c]
            if k == 0:
                continue
            biased = scores + biases[:, None]
            others = torch.cat([biased[:c], biased[c + 1:]], dim=0).amax(dim=0)
            margin = others - biased[c]                       # > 0 where c loses (or ties later)
            kth = torch.kthvalue(margin, k).values            # k-th smallest margin
            if kth >= 0:
                biases[c] += kth + _TIE_EPS * (1.0 + others.abs().max())
                changed = True
        if not changed:
            break
        # stop early when every target holds
        won = torch.bincount((scores + biases[:, None]).argmax(dim=0), minlength=p)
        if all(int(won[i]) >= ks[i] for i in range(p)):
            break
    return biases


def e_step(
    scores: Tensor,
    present: Tensor,
    params: EStepParams | None = None,
    *,
    background_index: int | None = 0,
    region: Tensor | None = None,
    ignore_index: int = 255,
    valid: Tensor | None = None,
) -> Tensor:
    """The E-step on a batch of score maps over a label space (Papandreou et al. 2015, Alg. 1).

    Args:
        scores: (N, K, H, W) float class scores (logits or log-probabilities) on any device.
        present: (N, K) bool (or 0/1) image-level labels z; the background column is treated as
            present whether set or not (every image has background).
        params: :class:`EStepParams` (default EM-Fixed, b_fg=5, b_bg=3, absent classes unbiased).
        background_index: the background channel, or ``None`` for spaces without one (then
            ``b_bg``/``rho_bg`` are unused).
        region: optional bool box mask, (N, H, W) ("inside any box") or (N, K, H, W) (inside a box
            of class k): non-background classes are allowed (and biased) only inside it; pixels
            outside go to the background (Bbox-EM-Fixed, Sec. 3.3). Requires a background class.
        ignore_index: label for rows with no present class at all, and for invalid pixels.
        valid: optional (N, H, W) bool, False on crop padding: those pixels are labelled
            ``ignore_index`` and do not count in EM-Adapt's pixel total. Default: all valid.

    Returns:
        (N, H, W) int64 labels in 0..K-1 (channel indices), ``ignore_index`` for rows with nothing
        present and for invalid pixels. No gradient flows (computed under ``torch.no_grad``).

    Raises:
        ValueError: on shape mismatches, or ``region`` without a background class.
    """
    params = params or EStepParams()
    _check_scores(scores, present)
    n, k, h, w = scores.shape
    suppress = params.absent_suppressed
    with torch.no_grad():
        pres = present.to(device=scores.device, dtype=torch.bool).clone()
        if background_index is not None:
            pres[:, background_index] = True
        if region is not None:
            if background_index is None:
                raise ValueError("region (Bbox-EM-Fixed) needs a label space with a background class")
            if region.shape not in ((n, h, w), (n, k, h, w)):
                raise ValueError(f"region must be (N, H, W) or (N, K, H, W), got {tuple(region.shape)}")
        if valid is not None:
            if valid.shape != (n, h, w):
                raise ValueError(f"valid must be (N, H, W) = ({n}, {h}, {w}) bool, got {tuple(valid.shape)}")
            valid = valid.to(device=scores.device, dtype=torch.bool)
        out = torch.full((n, h, w), ignore_index, dtype=torch.long, device=scores.device)
        all_ids = torch.arange(k, device=scores.device)
        for i in range(n):
            if not bool(pres[i].any()):
                continue
            # suppressed: only the present channels enter the argmax (O(P)); else all K compete
            ids = pres[i].nonzero(as_tuple=True)[0] if suppress else all_ids
            bg_pos = None
            if background_index is not None:
                bg_pos = int((ids == background_index).nonzero(as_tuple=True)[0][0])
            reg = None
            if region is not None:
                reg = region[i] if region.ndim == 3 else region[i][ids]
            vi = None if valid is None else valid[i]
            if vi is not None and not bool(vi.any()):
                continue
            lab = ids[_biased_scores(scores[i][ids], bg_pos, params, reg, pres[i][ids], vi).argmax(dim=0)]
            out[i] = lab if vi is None else lab.masked_fill(~vi, ignore_index)
    return out


def _biased_scores(scores_p: Tensor, bg_pos: int | None, params: EStepParams, region: Tensor | None,
                   present: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """f^ = f + b (Alg. 1) of one image on P candidate channels: (P, H, W) float32, -inf where a
    class is not allowed (outside its box region; absent when ``params.absent_suppressed``).

    ``present`` (P,) bool (default all True) marks the channels with z_l = 1: absent channels get
    bias 0 (Eq. 10) and EM-Adapt target 0. ``valid`` (H, W) bool (default all True): the pixels
    EM-Adapt counts and biases on (the caller labels the others ``ignore_index``)."""
    p, h, w = scores_p.shape
    f = scores_p.float()
    is_bg = torch.zeros(p, dtype=torch.bool, device=f.device)
    if bg_pos is not None:
        is_bg[bg_pos] = True
    pres = torch.ones(p, dtype=torch.bool, device=f.device) if present is None else present.to(f.device, torch.bool)
    if params.mode == "fixed":
        bias = torch.full((p,), params.b_fg, dtype=f.dtype, device=f.device)
        if bg_pos is not None:
            bias[bg_pos] = params.b_bg
        bias = bias.masked_fill(~pres, 0.0)
    else:
        flat = f.reshape(p, -1) if valid is None else f.reshape(p, -1)[:, valid.reshape(-1).to(f.device)]
        bias = adaptive_biases(flat, is_bg, params.rho_fg, params.rho_bg,
                               params.fg_share, params.num_iter, is_present=pres)
    fhat = f + bias[:, None, None]
    if params.absent_suppressed and not bool(pres.all()):
        fhat[~pres] = float("-inf")
    if region is not None:
        reg = region.to(device=f.device, dtype=torch.bool)
        allowed = reg.unsqueeze(0).expand(p, h, w) if reg.ndim == 2 else reg
        allowed = allowed.clone()
        allowed[is_bg] = True
        fhat = fhat.masked_fill(~allowed, float("-inf"))
    return fhat


def e_step_present(
    scores: np.ndarray | Tensor,
    class_ids: np.ndarray | Tensor | list[int],
    params: EStepParams | None = None,
    *,
    background_id: int | None = 0,
    region: np.ndarray | Tensor | None = None,
    return_scores: bool = False,
) -> np.ndarray | Tensor | tuple[np.ndarray | Tensor, np.ndarray | Tensor]:
    """E-step of one image in the present-labels-only layout (cost O(P), not O(label space)).

    The layout carries only the image's present classes, so absent classes cannot compete: this is
    the E-step with absent classes suppressed, and ``params`` must say so
    (``params.absent_suppressed``: EM-Adapt by default, EM-Fixed with ``suppress_absent: true``).
    EM-Fixed as in Eq. 10 (absent classes unbiased) needs every class's scores: use :func:`e_step`.

    Args:
        scores: (P, H, W) float scores of the image's present classes (numpy or torch).
        class_ids: (P,) label-space ids of those rows; must contain ``background_id`` when the
            space has a background.
        params: :class:`EStepParams` with ``absent_suppressed`` (default: EM-Fixed,
            ``suppress_absent=True``).
        background_id: label-space id of the background, or ``None``.
        region: optional (H, W) or (P, H, W) bool box mask (Bbox-EM-Fixed), as in :func:`e_step`.
        return_scores: also return the biased scores ``f^ = f + b`` (Alg. 1), (P, H, W) float32,
            ``-inf`` where a class is excluded (e.g. for a following dense CRF: ``softmax(f^)``).

    Returns:
        (H, W) int64 label-space ids (and the biased scores when ``return_scores``), numpy when
        ``scores`` is numpy, else tensors.

    Raises:
        ValueError: on shape mismatch, a missing background row, or params whose absent classes
            are not suppressed.
    """
    params = params or EStepParams(suppress_absent=True)
    if not params.absent_suppressed:
        raise ValueError(
            "e_step_present holds only the present classes, so absent classes cannot keep their raw "
            "scores (EM-Fixed, Eq. 10); set suppress_absent: true, or run e_step on all K classes' scores")
    is_np = isinstance(scores, np.ndarray)
    s = torch.from_numpy(np.ascontiguousarray(scores)) if is_np else scores
    ids = torch.as_tensor(np.asarray(class_ids) if not isinstance(class_ids, Tensor) else class_ids,
                          dtype=torch.long, device=s.device)
    if s.ndim != 3 or ids.shape != s.shape[:1]:
        raise ValueError(f"scores must be (P, H, W) with P = len(class_ids), got {tuple(s.shape)} and {tuple(ids.shape)}")
    bg_pos = None
    if background_id is not None:
        hit = (ids == background_id).nonzero(as_tuple=True)[0]
        if hit.numel() != 1:
            raise ValueError(f"class_ids {ids.tolist()} must contain the background id {background_id} exactly once")
        bg_pos = int(hit[0])
    reg = None
    if region is not None:
        reg = torch.from_numpy(np.asarray(region)) if isinstance(region, np.ndarray) else region
    with torch.no_grad():
        fhat = _biased_scores(s, bg_pos, params, reg)
        lab = ids[fhat.argmax(dim=0)]
    if return_scores:
        return (lab.cpu().numpy(), fhat.cpu().numpy()) if is_np else (lab, fhat)
    return lab.cpu().numpy() if is_np else lab


def em_fixed(scores: Tensor, present: Tensor, b_fg: float = 5.0, b_bg: float = 3.0,
             suppress_absent: bool | None = None, **kw) -> Tensor:
    """EM-Fixed E-step (Sec. 3.2, Eq. 10): ``e_step`` with ``mode="fixed"``; see :func:`e_step`."""
    return e_step(scores, present, EStepParams(mode="fixed", b_fg=b_fg, b_bg=b_bg,
                                               suppress_absent=suppress_absent), **kw)


def em_adapt(scores: Tensor, present: Tensor, rho_fg: float = 0.20, rho_bg: float = 0.40,
             fg_share: Literal["total", "per_class"] = "per_class", **kw) -> Tensor:
    """EM-Adapt E-step (Sec. 3.2): ``e_step`` with ``mode="adapt"``; see :func:`e_step`."""
    return e_step(scores, present, EStepParams(mode="adapt", rho_fg=rho_fg, rho_bg=rho_bg, fg_share=fg_share), **kw)
