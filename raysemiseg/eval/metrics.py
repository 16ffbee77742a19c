"""The one segmentation metric: a confusion matrix, reduced across DDP workers, and mIoU from it.

Protocol (PASCAL VOC 2012 devkit, Everingham et al. 2015, Sec. 4.3 / ``VOCevalseg.m``): for each
class ``k`` with confusion matrix ``C`` (rows = ground truth, columns = prediction, pixels whose
ground truth is ``ignore_index`` skipped)::

    IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k])      # TP / (TP + FN + FP)

A class absent from both the prediction and the ground truth (denominator 0) has no IoU (NaN) and
is excluded from the mean; ``mIoU = nanmean_k IoU_k``. Pixel accuracy is ``trace(C) / sum(C)``;
mean accuracy is the mean over classes present in the ground truth of ``C[k, k] / sum_j C[k, j]``.

Accumulation follows torchvision's ``references/segmentation/utils.py``: one ``torch.bincount``
per update on the tensors' own device, and one ``all_reduce`` (sum) across workers at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from raysemiseg.labels import LabelSpace

__all__ = [
    "ConfusionMatrix",
    "SegMetrics",
    "compute_metrics",
    "format_iou_table",
    "miou_over",
]


@dataclass(frozen=True)
class SegMetrics:
    """Metrics computed from one (reduced) confusion matrix.

    Attributes:
        miou: mean IoU over the classes that appear in prediction or ground truth, in [0, 1]
            (NaN when no pixel was counted at all).
        iou: (K,) float64 per-class IoU in [0, 1], NaN for classes absent from both.
        pixel_acc: fraction of counted (non-ignored) pixels predicted correctly, in [0, 1].
        mean_acc: mean over ground-truth-present classes of per-class recall, in [0, 1].
        acc: (K,) float64 per-class recall ``C[k,k] / sum_j C[k,j]``, NaN where the class is
            absent from the ground truth.
        confusion: (K, K) int64 counts, rows = ground truth, columns = prediction.
    """

    miou: float
    iou: np.ndarray
    pixel_acc: float
    mean_acc: float
    acc: np.ndarray
    confusion: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def miou_over(self, class_ids: Iterable[int]) -> float:
        """mIoU over a subset of class ids (e.g. C3S strong vs weak classes); see :func:`miou_over`."""
        return miou_over(self.iou, class_ids)

    def to_dict(self, label_space: LabelSpace | None = None, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: float}`` for logging: miou, pixel_acc, mean_acc and ``iou/<class>``
        (class names from ``label_space``, else ids); excluded classes are left out."""
        out = {f"{prefix}miou": self.miou, f"{prefix}pixel_acc": self.pixel_acc, f"{prefix}mean_acc": self.mean_acc}
        for k, v in enumerate(self.iou):
            if not np.isnan(v):
                name = label_space.names[k] if label_space is not None else str(k)
                out[f"{prefix}iou/{name}"] = float(v)
        return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def miou_over(iou: np.ndarray | SegMetrics, class_ids: Iterable[int]) -> float:
    """Mean IoU over the given class ids, skipping excluded (NaN) classes.

    Used for the strong-class vs weak-class mIoU of C3S split-sets (Xiao et al. 2018, Table 2).

    Args:
        iou: (K,) per-class IoU (NaN = excluded) or a :class:`SegMetrics`.
        class_ids: ids in ``0..K-1``; duplicates count once.

    Returns:
        The mean in [0, 1], or NaN when every listed class is excluded (or the list is empty).

    Raises:
        ValueError: an id outside ``0..K-1``.
    """
    arr = iou.iou if isinstance(iou, SegMetrics) else np.asarray(iou, dtype=np.float64)
    ids = sorted({int(i) for i in class_ids})
    bad = [i for i in ids if not 0 <= i < arr.shape[0]]
    if bad:
        raise ValueError(f"class ids {bad} outside 0..{arr.shape[0] - 1}")
    return _nanmean(arr[ids]) if ids else float("nan")


def compute_metrics(confusion: np.ndarray | Tensor) -> SegMetrics:
    """VOC-protocol metrics from a (K, K) confusion matrix (rows = ground truth, cols = prediction).

    Raises:
        ValueError: the matrix is not square or has negative entries.
    """
    c = confusion.detach().cpu().numpy() if isinstance(confusion, Tensor) else np.asarray(confusion)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("confusion matrix has negative counts")
    c = c.astype(np.int64)
    tp = np.diag(c).astype(np.float64)
    gt = c.sum(axis=1).astype(np.float64)
    pred = c.sum(axis=0).astype(np.float64)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = c.sum()
    return SegMetrics(
        miou=_nanmean(iou),
        iou=iou,
        pixel_acc=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_acc=_nanmean(acc),
        acc=acc,
        confusion=c,
    )


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix on a torch device.

    Args:
        num_classes: K, the label space's number of classes.
        ignore_index: ground-truth value skipped (VOC void = 255). Predictions never equal it.
        device: where the matrix lives; ``None`` = the device of the first ``update``'s tensors.
            Under NCCL the matrix must be on the worker's GPU (it is moved there for the reduce).

    Example::

        cm = ConfusionMatrix(space.num_classes, space.ignore_index)
        for images, masks in loader:
            cm.update(model.predict(images).argmax(1), masks)
        cm.reduce_from_all_processes()   # no-op outside torch.distributed
        print(format_iou_table(cm.compute(), space))
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (0..{num_classes - 1})")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat: Tensor | None = (
            torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if device is not None else None
        )
        self._reduced = False

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        if self.mat is not None:
            self.mat.zero_()
        self._reduced = False

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: int tensor of predicted class ids in ``0..K-1``, any shape (e.g. (N, H, W)).
            target: int tensor of ground-truth ids in ``0..K-1`` or ``ignore_index``, same shape.

        Raises:
            ValueError: shapes differ, float tensors, or ids out of range (naming the offending values).
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class-id tensors (take argmax of logits first)")
        if self.mat is None:
            self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=pred.device)
        k = self.num_classes
        t = target.reshape(-1).to(self.mat.device, torch.int64)
        p = pred.reshape(-1).to(self.mat.device, torch.int64)
        keep = t != self.ignore_index
        t, p = t[keep], p[keep]
        if t.numel() == 0:
            return
        t_bad, p_bad = (t < 0) | (t >= k), (p < 0) | (p >= k)
        if bool((t_bad | p_bad).any()):  # one host sync per update
            if bool(t_bad.any()):
                bad = torch.unique(t[t_bad])[:10].tolist()
                raise ValueError(f"target has ids {bad} outside 0..{k - 1} and != ignore_index {self.ignore_index}")
            bad = torch.unique(p[p_bad])[:10].tolist()
            raise ValueError(f"pred has ids {bad} outside 0..{k - 1}")
        self.mat += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over all ``torch.distributed`` ranks with one ``all_reduce``.

        A no-op when torch.distributed is not initialised (single process). Every rank must call
        it (it is a collective), even a rank that saw no data.

        Raises:
            RuntimeError: called twice without :meth:`reset` (would double-count).
        """
        if self._reduced:
            raise RuntimeError("confusion matrix already reduced; call reset() before accumulating again")
        if self.mat is None:
            self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            mat = self.mat
            if dist.get_backend() == "nccl" and mat.device.type != "cuda":
                mat = mat.cuda()
            dist.all_reduce(mat, op=dist.ReduceOp.SUM)
            self.mat = mat.to(self.mat.device)
        self._reduced = True

    def compute(self) -> SegMetrics:
        """Metrics of the counts so far (call :meth:`reduce_from_all_processes` first under DDP)."""
        if self.mat is None:
            return compute_metrics(np.zeros((self.num_classes, self.num_classes), dtype=np.int64))
        return compute_metrics(self.mat)


def format_iou_table(
    metrics: SegMetrics,
    label_space: LabelSpace,
    title: str | None = None,
    classes: Sequence[int] | None = None,
) -> str:
    """A plain-text per-class IoU table (percent), one row per class, with a summary footer.

    Args:
        metrics: from :meth:`ConfusionMatrix.compute`.
        label_space: names the classes; its ``num_classes`` must equal the metrics' K.
        title: optional first line.
        classes: optional class ids to list; the footer then also gives the mIoU over them.

    Returns:
        The table; excluded classes (absent from prediction and ground truth) show ``-``.

    Raises:
        ValueError: K mismatch or a class id out of range.
    """
    k = metrics.num_classes
    if label_space.num_classes != k:
        raise ValueError(f"label space {label_space.name!r} has {label_space.num_classes} classes, metrics have {k}")
    ids = list(range(k)) if classes is None else [int(c) for c in classes]
    bad = [c for c in ids if not 0 <= c < k]
    if bad:
        raise ValueError(f"classes {bad} outside 0..{k - 1}")
    width = max([len("class")] + [len(label_space.names[c]) for c in ids])
    gt_pixels = metrics.confusion.sum(axis=1)

    def pct(v: float) -> str:
        return "     -" if np.isnan(v) else f"{100.0 * v:6.2f}"

    lines: list[str] = []
    if title:
        lines.append(title)
    header = f"{'id':>5}  {'class':<{width}}  {'IoU %':>6}  {'acc %':>6}  {'gt pixels':>10}"
    lines += [header, "-" * len(header)]
    for c in ids:
        lines.append(
            f"{c:>5}  {label_space.names[c]:<{width}}  {pct(metrics.iou[c])}  {pct(metrics.acc[c])}  {int(gt_pixels[c]):>10}"
        )
    lines.append("-" * len(header))
    n_used = int((~np.isnan(metrics.iou)).sum())
    lines.append(f"{'mIoU':<{width + 7}}  {pct(metrics.miou)}   ({n_used}/{k} classes present)")
    if classes is not None:
        lines.append(f"{'mIoU (listed)':<{width + 7}}  {pct(miou_over(metrics.iou, ids))}")
    lines.append(f"{'pixel acc':<{width + 7}}  {pct(metrics.pixel_acc)}")
    lines.append(f"{'mean acc':<{width + 7}}  {pct(metrics.mean_acc)}")
    return "\n".join(lines)
