"""Losses of the strong-weak dual-branch network and its baselines (Luo & Yang, ECCV 2020).

The cross-entropy itself is the project's one masked CE
(:func:`raysemiseg.methods.wssl.losses.masked_cross_entropy`); this module holds the pieces that
are specific to the paper: which rows feed which branch, and the lambda-weighted average of two
networks (Eq. 4).
"""

from __future__ import annotations

from torch import Tensor

from raysemiseg.methods.wssl.losses import masked_cross_entropy


def dual_branch_loss(strong_logits: Tensor, strong_t: Tensor, weak_logits: Tensor, weak_t: Tensor,
                     ignore_index: int = 255, weak_weight: float = 1.0) -> dict[str, Tensor]:
    """Luo & Yang's loss: ``CE(strong branch, strong rows) + weak_weight * CE(weak branch, weak rows)``
    (equal weights in the paper, ``weak_weight = 1``).

    Args:
        strong_logits: (Ns, K, h, w) strong-branch scores of the strong rows only.
        strong_t: (Ns, H, W) int64 their masks.
        weak_logits: (Nw, K, h, w) weak-branch scores of the weak rows only.
        weak_t: (Nw, H, W) int64 their pseudo labels.

    Returns:
        ``{"strong_ce": scalar, "weak_ce": scalar}`` (each 0 when its rows are absent).
    """
    return {
        "strong_ce": masked_cross_entropy(strong_logits, strong_t, ignore_index),
        "weak_ce": weak_weight * masked_cross_entropy(weak_logits, weak_t, ignore_index),
    }


def lambda_average(prob_strong: Tensor, prob_weak: Tensor, lam: float) -> Tensor:
    """Eq. 4 of Luo & Yang (the "two separate networks" baseline):
    ``F(x) = lam * F_w(x) + (1 - lam) * F_s(x)``, the per-pixel class probabilities of a network
    trained on weak labels (``F_w``) and one trained on strong labels (``F_s``), with ``lam`` on
    the WEAK one, as in the paper (best ``lam = 0.4``; Fig. 6 sweeps it from 0 = strong only to
    1 = weak only).

    Args:
        prob_strong: (N, K, H, W) softmax probabilities of the strong-label network, F_s.
        prob_weak: (N, K, H, W) softmax probabilities of the weak-label network, F_w.
        lam: lambda, the weak network's weight, in [0, 1].

    Returns:
        (N, K, H, W) probabilities (each pixel sums to 1).

    Raises:
        ValueError: ``lam`` outside [0, 1] or shape mismatch.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if prob_strong.shape != prob_weak.shape:
        raise ValueError(f"shape mismatch {tuple(prob_strong.shape)} vs {tuple(prob_weak.shape)}")
    return lam * prob_weak + (1.0 - lam) * prob_strong
