"""The one segmentation metric: per-class TP / FP / FN counts, reduced across DDP workers, and mIoU.

Protocol (PASCAL VOC 2012 devkit, Everingham et al. 2015, Sec. 4.3 / ``VOCevalseg.m``): for each
class ``k``, over the pixels whose ground truth is not ``ignore_index``::

    IoU_k = TP_k / (TP_k + FN_k + FP_k) = tp_k / (gt_k + pred_k - tp_k)

with ``tp_k`` the pixels of class ``k`` predicted as ``k``, ``gt_k`` the ground-truth pixels of
class ``k`` and ``pred_k`` the pixels predicted as ``k``. These three (K,) vectors are the row sums,
column sums and diagonal of the VOC confusion matrix, and all the protocol needs: the state is
``3 * K`` int64 counts (0.5 MB at K = 21,841), not a dense K x K matrix (3.8 GB). A class absent
from both the prediction and the ground truth (denominator 0) has no IoU (NaN) and is excluded from
the mean; ``mIoU = nanmean_k IoU_k``. Pixel accuracy is ``sum(tp) / sum(gt)``; mean accuracy is
the mean over classes present in the ground truth of ``tp_k / gt_k``.

Accumulation: three ``torch.bincount(minlength=K)`` per update on the tensors' own device
(``bincount(target)``, ``bincount(pred)``, ``bincount(target[target == pred])``), and one
``all_reduce`` (sum) of the (3, K) state across workers at the end.

The same counts over *image-level* label sets (:class:`LabelCounts`) give the multi-label
classification scores used when a validation split has no pixel masks (the ImageNet-21k case):
per-class precision / recall / F1 and their micro average (Tsoumakas & Katakis 2007), also O(K).
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
    "IoUCounts",
    "LabelCounts",
    "LabelMetrics",
    "SegMetrics",
    "compute_metrics",
    "format_iou_table",
    "metrics_from_counts",
    "miou_over",
]


@dataclass(frozen=True)
class SegMetrics:
    """Metrics computed from one (reduced) set of per-class counts.

    Attributes:
        miou: mean IoU over the classes that appear in prediction or ground truth, in [0, 1]
            (NaN when no pixel was counted at all).
        iou: (K,) float64 per-class IoU in [0, 1], NaN for classes absent from both.
        pixel_acc: fraction of counted (non-ignored) pixels predicted correctly, in [0, 1].
        mean_acc: mean over ground-truth-present classes of per-class recall, in [0, 1].
        acc: (K,) float64 per-class recall ``tp_k / gt_k``, NaN where the class is absent from
            the ground truth.
        tp: (K,) int64 pixels of class k predicted as k (the confusion matrix's diagonal).
        gt_pixels: (K,) int64 ground-truth pixels of class k (its row sums).
        pred_pixels: (K,) int64 pixels predicted as class k (its column sums).
    """

    miou: float
    iou: np.ndarray
    pixel_acc: float
    mean_acc: float
    acc: np.ndarray
    tp: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.iou.shape[0])

    @property
    def num_pixels(self) -> int:
        """Counted (non-ignored) pixels; 0 when no row had a mask."""
        return int(self.gt_pixels.sum())

    def miou_over(self, class_ids: Iterable[int]) -> float:
        """mIoU over a subset of class ids (e.g. C3S strong vs weak classes); see :func:`miou_over`."""
        return miou_over(self.iou, class_ids)

    def to_dict(self, label_space: LabelSpace | None = None, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: float}`` for logging: miou, pixel_acc, mean_acc and ``iou/<class>``
        (class names from ``label_space``, else ids); excluded classes are left out."""
        out = {f"{prefix}miou": self.miou, f"{prefix}pixel_acc": self.pixel_acc, f"{prefix}mean_acc": self.mean_acc}
        for k in np.flatnonzero(~np.isnan(self.iou)):
            name = label_space.names[k] if label_space is not None else str(k)
            out[f"{prefix}iou/{name}"] = float(self.iou[k])
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


def _np(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def metrics_from_counts(tp: np.ndarray | Tensor, gt: np.ndarray | Tensor, pred: np.ndarray | Tensor) -> SegMetrics:
    """VOC-protocol metrics from per-class counts.

    Args:
        tp: (K,) pixels of class k predicted as k.
        gt: (K,) ground-truth pixels of class k.
        pred: (K,) pixels predicted as class k.

    Raises:
        ValueError: shapes differ or are not (K,), negative counts, or ``tp`` exceeds ``gt`` or
            ``pred`` for some class (naming the first such class).
    """
    tp_, gt_, pr_ = (_np(v).astype(np.int64) for v in (tp, gt, pred))
    if tp_.ndim != 1 or tp_.shape != gt_.shape or tp_.shape != pr_.shape:
        raise ValueError(f"counts must be three (K,) vectors, got shapes {tp_.shape}, {gt_.shape}, {pr_.shape}")
    if (tp_ < 0).any() or (gt_ < 0).any() or (pr_ < 0).any():
        raise ValueError("per-class counts are negative")
    over = np.flatnonzero((tp_ > gt_) | (tp_ > pr_))
    if over.size:
        k = int(over[0])
        raise ValueError(f"class {k}: tp {tp_[k]} exceeds gt {gt_[k]} or pred {pr_[k]}")
    tpf, gtf, prf = tp_.astype(np.float64), gt_.astype(np.float64), pr_.astype(np.float64)
    union = gtf + prf - tpf
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tpf / union, np.nan)
        acc = np.where(gtf > 0, tpf / gtf, np.nan)
    total = gt_.sum()
    return SegMetrics(
        miou=_nanmean(iou),
        iou=iou,
        pixel_acc=float(tpf.sum() / total) if total > 0 else float("nan"),
        mean_acc=_nanmean(acc),
        acc=acc,
        tp=tp_,
        gt_pixels=gt_,
        pred_pixels=pr_,
    )


def compute_metrics(confusion: np.ndarray | Tensor) -> SegMetrics:
    """VOC-protocol metrics from a (K, K) confusion matrix (rows = ground truth, cols = prediction).

    For callers that already hold a small matrix (tests, reports of a few classes); the training
    and evaluation paths accumulate :class:`IoUCounts` instead, which never builds one.

    Raises:
        ValueError: the matrix is not square or has negative entries.
    """
    c = _np(confusion)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("confusion matrix has negative counts")
    c = c.astype(np.int64)
    return metrics_from_counts(np.diag(c), c.sum(axis=1), c.sum(axis=0))


class _ClassCounts:
    """A (3, K) int64 count state (rows: tp, gt, pred) on a torch device, summed across ranks."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.counts: Tensor | None = (
            torch.zeros(3, num_classes, dtype=torch.int64, device=device) if device is not None else None
        )
        self._reduced = False

    def state_numel(self) -> int:
        """Number of int64 counts held (``3 * K``): the state that is all_reduced."""
        return 3 * self.num_classes

    def _ensure(self, device: torch.device) -> Tensor:
        if self.counts is None:
            self.counts = torch.zeros(3, self.num_classes, dtype=torch.int64, device=device)
        return self.counts

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        if self.counts is not None:
            self.counts.zero_()
        self._reduced = False

    def reduce_from_all_processes(self) -> None:
        """Sum the counts over all ``torch.distributed`` ranks with one ``all_reduce`` of (3, K).

        A no-op when torch.distributed is not initialised (single process). Every rank must call
        it (it is a collective), even a rank that saw no data.

        Raises:
            RuntimeError: called twice without :meth:`reset` (would double-count).
        """
        if self._reduced:
            raise RuntimeError("counts already reduced; call reset() before accumulating again")
        counts = self._ensure(torch.device("cpu"))
        if dist.is_available() and dist.is_initialized():
            buf = counts
            if dist.get_backend() == "nccl" and buf.device.type != "cuda":
                buf = buf.cuda()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            self.counts = buf.to(counts.device)
        self._reduced = True

    def _host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.counts is None:
            z = np.zeros(self.num_classes, np.int64)
            return z, z.copy(), z.copy()
        c = self.counts.cpu().numpy()
        return c[0], c[1], c[2]


class IoUCounts(_ClassCounts):
    """Accumulates per-class pixel counts (tp, gt, pred: 3 * K int64) on a torch device.

    Args:
        num_classes: K, the label space's number of classes.
        ignore_index: ground-truth value skipped (VOC void = 255). Predictions never equal it.
        device: where the counts live; ``None`` = the device of the first ``update``'s tensors.
            Under NCCL the counts must be on the worker's GPU (they are moved there for the reduce).

    Example::

        cm = IoUCounts(space.num_classes, space.ignore_index)
        for images, masks in loader:
            cm.update(model.predict(images).argmax(1), masks)
        cm.reduce_from_all_processes()   # no-op outside torch.distributed
        print(format_iou_table(cm.compute(), space))
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (0..{num_classes - 1})")
        super().__init__(num_classes, device)
        self.ignore_index = int(ignore_index)

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
        counts = self._ensure(pred.device)
        k = self.num_classes
        t = target.reshape(-1).to(counts.device, torch.int64)
        p = pred.reshape(-1).to(counts.device, torch.int64)
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
        counts[0] += torch.bincount(t[t == p], minlength=k)
        counts[1] += torch.bincount(t, minlength=k)
        counts[2] += torch.bincount(p, minlength=k)

    def compute(self) -> SegMetrics:
        """Metrics of the counts so far (call :meth:`reduce_from_all_processes` first under DDP)."""
        return metrics_from_counts(*self._host())


#: The former name of :class:`IoUCounts` (it held a dense K x K confusion matrix); same API.
ConfusionMatrix = IoUCounts


@dataclass(frozen=True)
class LabelMetrics:
    """Multi-label image classification scores from per-class image counts.

    Attributes:
        micro_f1: ``2 * sum(tp) / (sum(gt) + sum(pred))`` over every (image, class) decision, in
            [0, 1]; NaN when no image had a true or a predicted label.
        macro_f1: mean of the per-class F1 over classes with a true or predicted image, in [0, 1].
        precision: ``sum(tp) / sum(pred)`` (NaN when nothing was predicted).
        recall: ``sum(tp) / sum(gt)`` (NaN when no image had a label).
        f1: (K,) float64 per-class F1 ``2 tp / (gt + pred)``, NaN for classes absent from both.
        tp / gt_images / pred_images: (K,) int64 images where class k was true and predicted /
            true / predicted.
        num_images: images scored.
    """

    micro_f1: float
    macro_f1: float
    precision: float
    recall: float
    f1: np.ndarray
    tp: np.ndarray
    gt_images: np.ndarray
    pred_images: np.ndarray
    num_images: int


class LabelCounts(_ClassCounts):
    """Accumulates per-class image-level counts (tp, gt, pred: 3 * K int64) of label *sets*.

    One image contributes 1 to ``gt[k]`` for each true label k, 1 to ``pred[k]`` for each predicted
    label k and 1 to ``tp[k]`` when k is both. The number of images scored is kept beside the
    counts (reduced with them). Args as :class:`IoUCounts` (no ignore index).
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        super().__init__(num_classes, device)
        self.num_images = 0

    def state_numel(self) -> int:
        return 3 * self.num_classes + 1

    def reset(self) -> None:
        super().reset()
        self.num_images = 0

    def update(self, pred_ids: Sequence[int] | Tensor, true_ids: Sequence[int] | Tensor) -> None:
        """Add one image's predicted and true label ids (duplicates count once).

        Raises:
            ValueError: an id outside ``0..K-1`` (naming it).
        """
        counts = self._ensure(torch.device("cpu") if self.counts is None else self.counts.device)
        k = self.num_classes
        p = torch.unique(torch.as_tensor(pred_ids, dtype=torch.int64).reshape(-1)).to(counts.device)
        t = torch.unique(torch.as_tensor(true_ids, dtype=torch.int64).reshape(-1)).to(counts.device)
        for what, ids in (("predicted", p), ("true", t)):
            bad = ids[(ids < 0) | (ids >= k)]
            if bad.numel():
                raise ValueError(f"{what} label ids {bad[:10].tolist()} outside 0..{k - 1}")
        both = t[torch.isin(t, p)]
        counts[0].index_add_(0, both, torch.ones_like(both))
        counts[1].index_add_(0, t, torch.ones_like(t))
        counts[2].index_add_(0, p, torch.ones_like(p))
        self.num_images += 1

    def reduce_from_all_processes(self) -> None:
        """As :meth:`IoUCounts.reduce_from_all_processes`; the image count travels in the same buffer."""
        if self._reduced:
            raise RuntimeError("counts already reduced; call reset() before accumulating again")
        counts = self._ensure(torch.device("cpu"))
        if dist.is_available() and dist.is_initialized():
            buf = torch.cat([counts.reshape(-1), counts.new_tensor([self.num_images])])
            if dist.get_backend() == "nccl" and buf.device.type != "cuda":
                buf = buf.cuda()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf = buf.to(counts.device)
            self.counts = buf[:-1].reshape(3, self.num_classes).clone()
            self.num_images = int(buf[-1])
        self._reduced = True

    def compute(self) -> LabelMetrics:
        """Scores of the counts so far (call :meth:`reduce_from_all_processes` first under DDP)."""
        tp, gt, pred = self._host()
        tpf, gtf, prf = tp.astype(np.float64), gt.astype(np.float64), pred.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(gtf + prf > 0, 2 * tpf / (gtf + prf), np.nan)
        s_tp, s_gt, s_pr = tpf.sum(), gtf.sum(), prf.sum()
        return LabelMetrics(
            micro_f1=float(2 * s_tp / (s_gt + s_pr)) if s_gt + s_pr > 0 else float("nan"),
            macro_f1=_nanmean(f1),
            precision=float(s_tp / s_pr) if s_pr > 0 else float("nan"),
            recall=float(s_tp / s_gt) if s_gt > 0 else float("nan"),
            f1=f1, tp=tp, gt_images=gt, pred_images=pred, num_images=int(self.num_images))


def format_iou_table(
    metrics: SegMetrics,
    label_space: LabelSpace,
    title: str | None = None,
    classes: Sequence[int] | None = None,
) -> str:
    """A plain-text per-class IoU table (percent), one row per class, with a summary footer.

    Args:
        metrics: from :meth:`IoUCounts.compute`.
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
    gt_pixels = metrics.gt_pixels

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
