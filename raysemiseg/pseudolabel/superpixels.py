"""Superpixel self-diffusion of CAMs (Xiao et al., "Transferable Semi-supervised Semantic
Segmentation", AAAI 2018, Sec. 3.2 and Eq. 2).

Pipeline for one image, all on the superpixel graph (never a pixel-level random walk):

1. SLIC superpixels (Achanta et al. 2012, scikit-image) -> region adjacency graph: superpixels i, j
   are neighbours when any of their pixels touch (4-connectivity).
2. Edge weights, Xiao et al. Eq. 2::

       z_ij = exp(-||F(p_i) - F(p_j)|| / (2 sigma^2))

   with F = the superpixel's mean CIELAB colour (L in 0..100, a/b in about -128..127), concatenated
   with ``agnostic_weight * mean(M)`` when a class-agnostic map M in [0, 1] is given.
3. Seeds, per present foreground class c (one diffusion per class, ``q_c``):
   superpixels whose mean CAM_c exceeds ``seed_threshold`` are fixed to ``q_c = 1`` (Xiao et al.);
   fixed to ``q_c = 0`` are (a) superpixels that are seeds of another present class, and (b)
   background seeds: superpixels where every present class's mean CAM is below ``bg_seed_threshold``.
   (The harmonic solution needs 0-valued boundary nodes, else it is 1 everywhere; this is our
   documented choice.)
4. The harmonic (random-walk) solution on the graph Laplacian ``L = D - Z``: for the free nodes u
   and fixed nodes l, ``(L_uu + eps I) q_u = Z_ul q_l`` (Grady 2006), solved with scipy.sparse
   (``spsolve``). ``eps`` (1e-6 of the mean degree) makes components without any seed solvable and
   sends them to 0.
5. Label = ``argmax_c q_c`` per superpixel; background where every ``q_c < bg_threshold``; painted
   back to pixels through the SLIC map.

Only the image's present classes are touched (P CAMs, P solves on a graph of ~n_segments nodes).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DiffusionParams",
    "harmonic_solution",
    "region_adjacency",
    "self_diffusion",
    "slic_superpixels",
    "superpixel_affinity",
    "superpixel_means",
]


class DiffusionParams(BaseModel):
    """Parameters of SLIC + self-diffusion.

    Attributes:
        n_segments: approximate number of SLIC superpixels.
        compactness: SLIC compactness (colour vs space trade-off; scikit-image units).
        slic_scale: SLIC runs on the image resized by this factor (<= 1, speed); the superpixel map
            is upsampled back (nearest) to full resolution.
        sigma: the sigma of Eq. 2 (CIELAB units).
        agnostic_weight: scale of the class-agnostic map M in the feature F (0 = unused).
        seed_threshold: mean CAM above which a superpixel is a seed (q = 1) of its class.
        bg_seed_threshold: superpixels with every present CAM below this are background seeds (q = 0).
        bg_threshold: superpixels with every q_c below this are labelled background.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_segments: int = Field(300, ge=2)
    compactness: float = Field(10.0, gt=0)
    slic_scale: float = Field(0.5, gt=0, le=1)
    sigma: float = Field(3.0, gt=0)
    agnostic_weight: float = Field(50.0, ge=0)
    seed_threshold: float = Field(0.6, ge=0, le=1)
    bg_seed_threshold: float = Field(0.1, ge=0, le=1)
    bg_threshold: float = Field(0.5, ge=0, le=1)


def slic_superpixels(image: np.ndarray, n_segments: int = 300, compactness: float = 10.0,
                     scale: float = 1.0) -> np.ndarray:
    """SLIC superpixels (scikit-image) with consecutive ids.

    Args:
        image: (H, W, 3) uint8 RGB.
        n_segments, compactness: SLIC parameters.
        scale: run SLIC on the image resized by this factor (0 < scale <= 1), then upsample.

    Returns:
        (H, W) int64 superpixel ids 0..S-1 (every id used).
    """
    from PIL import Image
    from skimage.segmentation import slic

    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    small = img
    if scale < 1.0:
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        small = np.asarray(Image.fromarray(img).resize((sw, sh), Image.BILINEAR))
    seg = slic(small, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    if small.shape[:2] != (h, w):
        ys = np.minimum((np.arange(h) * small.shape[0]) // h, small.shape[0] - 1)
        xs = np.minimum((np.arange(w) * small.shape[1]) // w, small.shape[1] - 1)
        seg = seg[ys[:, None], xs[None, :]]
    _, seg = np.unique(seg, return_inverse=True)
    return seg.reshape(h, w).astype(np.int64)


def region_adjacency(segments: np.ndarray) -> np.ndarray:
    """Edges of the region adjacency graph of a superpixel map (4-connectivity).

    Args:
        segments: (H, W) int superpixel ids 0..S-1.

    Returns:
        (E, 2) int64 unique undirected edges with ``i < j``, sorted.
    """
    s = np.asarray(segments, dtype=np.int64)
    pairs = [np.stack([s[:, :-1].ravel(), s[:, 1:].ravel()], 1), np.stack([s[:-1].ravel(), s[1:].ravel()], 1)]
    e = np.concatenate(pairs)
    e = e[e[:, 0] != e[:, 1]]
    e.sort(axis=1)
    n = int(s.max()) + 1 if s.size else 0
    key = np.unique(e[:, 0] * n + e[:, 1])
    return np.stack([key // n, key % n], 1).astype(np.int64)


def superpixel_means(segments: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of per-pixel values over each superpixel.

    Args:
        segments: (H, W) int ids 0..S-1.
        values: (H, W) or (H, W, C) float values.

    Returns:
        (S, C) float64 means ((S, 1) for 2-D values).
    """
    seg = np.asarray(segments).ravel()
    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(seg.size, -1)
    n = int(seg.max()) + 1
    cnt = np.bincount(seg, minlength=n).astype(np.float64)
    out = np.stack([np.bincount(seg, weights=v[:, c], minlength=n) for c in range(v.shape[1])], 1)
    return out / np.maximum(cnt, 1)[:, None]


def superpixel_affinity(features: np.ndarray, edges: np.ndarray, sigma: float) -> np.ndarray:
    """Xiao et al. Eq. 2 edge weights ``z_ij = exp(-||F_i - F_j|| / (2 sigma^2))``.

    Args:
        features: (S, F) superpixel features.
        edges: (E, 2) int edges.
        sigma: the sigma of Eq. 2 (feature units).

    Returns:
        (E,) float64 weights in (0, 1].
    """
    d = np.linalg.norm(features[edges[:, 0]] - features[edges[:, 1]], axis=1)
    return np.exp(-d / (2.0 * sigma * sigma))


def harmonic_solution(num_nodes: int, edges: np.ndarray, weights: np.ndarray, fixed: np.ndarray,
                      values: np.ndarray) -> np.ndarray:
    """Harmonic function on a weighted graph with Dirichlet boundary (random-walk probabilities).

    Solves ``(L_uu + eps I) q_u = Z_ul q_l`` with ``L = D - Z`` (Grady 2006; Xiao et al. 2018
    self-diffusion) using ``scipy.sparse.linalg.spsolve``.

    Args:
        num_nodes: S.
        edges: (E, 2) int undirected edges.
        weights: (E,) positive weights z_ij.
        fixed: (S,) bool, True at boundary (seed) nodes.
        values: (S,) float boundary values (read where ``fixed``).

    Returns:
        (S,) float64 q, equal to ``values`` at fixed nodes, in [min, max] of the boundary values
        elsewhere (0 for free components without any fixed node).
    """
    q = np.where(fixed, values, 0.0).astype(np.float64)
    free = ~fixed
    if not free.any() or not fixed.any():
        return q
    i, j = edges[:, 0], edges[:, 1]
    z = sp.coo_matrix((np.r_[weights, weights], (np.r_[i, j], np.r_[j, i])), shape=(num_nodes, num_nodes)).tocsr()
    deg = np.asarray(z.sum(axis=1)).ravel()
    lap = sp.diags(deg) - z
    fu = np.flatnonzero(free)
    fl = np.flatnonzero(fixed)
    eps = 1e-6 * max(deg.mean(), 1e-12)
    a = lap[fu][:, fu] + eps * sp.identity(fu.size, format="csr")
    b = -(lap[fu][:, fl] @ q[fl])
    q[fu] = spla.spsolve(a.tocsc(), b)
    return q


def self_diffusion(
    image: np.ndarray,
    cams: np.ndarray,
    class_ids: np.ndarray | list[int],
    background_id: int = 0,
    params: DiffusionParams | None = None,
    agnostic: np.ndarray | None = None,
    segments: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CAM -> superpixel self-diffusion labels (Xiao et al. 2018; rule in the module docstring).

    Args:
        image: (H, W, 3) uint8 RGB.
        cams: (P, H, W) float CAMs in [0, 1] of the image's present foreground classes.
        class_ids: (P,) label-space ids of those classes (background not included).
        background_id: label-space id written where no class wins.
        params: :class:`DiffusionParams`.
        agnostic: optional (H, W) class-agnostic map M in [0, 1] (added to the features).
        segments: optional precomputed (H, W) superpixel ids (else SLIC is run).

    Returns:
        ``(labels, q_pix)``: (H, W) int64 label-space ids and (P + 1, H, W) float32 soft scores
        (row 0 = background ``1 - max_c q_c``, rows 1.. = ``q_c``), usable as CRF unary
        probabilities after normalisation.

    Raises:
        ValueError: on shape mismatches.
    """
    params = params or DiffusionParams()
    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    cams = np.asarray(cams, dtype=np.float32)
    ids = np.asarray(class_ids, dtype=np.int64)
    if cams.ndim != 3 or cams.shape[1:] != (h, w) or ids.shape != cams.shape[:1]:
        raise ValueError(f"cams must be (P, H, W) with (H, W) = {(h, w)} and P = len(class_ids); got "
                         f"{cams.shape}, {ids.shape}")
    p = cams.shape[0]
    if p == 0:
        return np.full((h, w), background_id, np.int64), np.ones((1, h, w), np.float32)
    from skimage.color import rgb2lab

    seg = segments if segments is not None else slic_superpixels(img, params.n_segments, params.compactness,
                                                                  params.slic_scale)
    s = int(seg.max()) + 1
    lab = rgb2lab(img)
    feats = [lab.reshape(-1, 3)]
    if agnostic is not None and params.agnostic_weight > 0:
        feats.append(params.agnostic_weight * np.asarray(agnostic, np.float64).reshape(-1, 1))
    cam_cols = np.moveaxis(cams, 0, -1).reshape(-1, p)
    means = superpixel_means(seg, np.concatenate(feats + [cam_cols], 1))
    f, cam_sp = means[:, :-p], means[:, -p:]                            # (S, F), (S, P)
    edges = region_adjacency(seg)
    z = superpixel_affinity(f, edges, params.sigma)
    seeds = cam_sp > params.seed_threshold                              # (S, P)
    bg_seeds = (cam_sp < params.bg_seed_threshold).all(axis=1)          # (S,)
    q = np.zeros((s, p))
    for c in range(p):
        one = seeds[:, c]
        zero = (seeds.any(axis=1) & ~one) | (bg_seeds & ~one)
        q[:, c] = harmonic_solution(s, edges, z, one | zero, one.astype(np.float64))
    best = q.argmax(axis=1)
    sp_label = np.where(q.max(axis=1) >= params.bg_threshold, ids[best], background_id)
    q_sp = np.concatenate([1.0 - q.max(axis=1, keepdims=True), q], axis=1).clip(0, 1)
    return sp_label[seg], np.moveaxis(q_sp[seg], -1, 0).astype(np.float32)
