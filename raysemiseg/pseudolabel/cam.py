"""Class activation maps (Zhou et al., "Learning Deep Features for Discriminative Localization",
CVPR 2016, Sec. 2).

For a network ending in global average pooling and a linear classifier with weights ``w^c``, the CAM
of class c at spatial position (x, y) is (Zhou et al., Sec. 2)::

    M_c(x, y) = sum_k w^c_k f_k(x, y)

with ``f_k`` the last convolutional feature maps. Here CAMs are computed for the image's present
labels only (one row of the classifier per present class, O(P) per image, never O(label space)),
then ReLU, bilinear upsampling to the requested output resolution, and per-class normalisation to
[0, 1] by the map's maximum (``M / (max M + eps)``, all-zero maps stay 0).

The classifier producing ``w`` is the ``cam_classifier`` method
(:mod:`raysemiseg.methods.cam_classifier`), trained with the shared loop on image-level labels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_activation_maps"]


def class_activation_maps(
    features: Tensor,
    weight: Tensor,
    rows: Sequence[Sequence[int] | Tensor],
    out_size: tuple[int, int] | Sequence[tuple[int, int]],
    eps: float = 1e-5,
) -> list[Tensor]:
    """CAMs of the present classes, ReLU'd, upsampled and normalised to [0, 1] per class.

    Args:
        features: (N, C, h, w) float backbone features.
        weight: (K', C) or (K', C, 1, 1) classifier weights (one row per classifier output).
        rows: per image, the classifier rows (P_i indices into ``weight``) of its present classes.
        out_size: (H, W) output resolution in pixels, shared or one per image.
        eps: added to the maximum before dividing.

    Returns:
        list of N float tensors (P_i, H_i, W_i) in [0, 1] (each non-zero map has maximum ~1), on
        ``features``' device.

    Raises:
        ValueError: on shape mismatch or a row index outside 0..K'-1.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (N, C, h, w), got {tuple(features.shape)}")
    w2 = weight.reshape(weight.shape[0], -1)
    n, c = features.shape[:2]
    if w2.shape[1] != c:
        raise ValueError(f"weight has {w2.shape[1]} input channels, features have {c}")
    if len(rows) != n:
        raise ValueError(f"rows must list the present classes of each of the {n} images, got {len(rows)}")
    sizes = [tuple(out_size)] * n if isinstance(out_size[0], int) else [tuple(s) for s in out_size]  # type: ignore[arg-type]
    out: list[Tensor] = []
    for i in range(n):
        r = torch.as_tensor(rows[i], dtype=torch.long, device=features.device).reshape(-1)
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= w2.shape[0]):
            raise ValueError(f"image {i}: classifier rows {r.tolist()} outside 0..{w2.shape[0] - 1}")
        h, w = sizes[i]
        if r.numel() == 0:
            out.append(features.new_zeros((0, h, w)))
            continue
        cam = torch.einsum("pc,chw->phw", w2[r].to(features.dtype), features[i])
        cam = F.interpolate(F.relu(cam)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(0)[:, None, None]
        out.append(cam / (peak + eps))
    return out
