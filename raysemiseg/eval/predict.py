"""Predictions and mIoU of a trained method on a store split (optionally dense-CRF refined).

``evaluate_rows`` runs one method over decoded rows at native resolution (logits bilinearly
resized back; :func:`~raysemiseg.train.loop.predict_image`, so the CAM classifier builds dense maps
over a few candidate classes only), accumulates the shared O(K) counts
(:class:`~raysemiseg.eval.metrics.IoUCounts` over rows with a mask,
:class:`~raysemiseg.eval.metrics.LabelCounts` over rows with image-level labels), and keeps the
first ``num_samples`` (image, ground truth, prediction) triples for overlays. A tqdm bar shows
progress (``progress=False`` turns it off).

Dense CRF (``crf=True``): the pseudo-label engine's one implementation
(:func:`raysemiseg.pseudolabel.crf.crf_labels`, DeepLab-CRF-LargeFOV parameters, 10 mean-field
iterations) over background + the classes the network predicts in the image (Chen et al. 2015
post-processing; the label restriction keeps the cost independent of the label-space size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from raysemiseg.eval.metrics import IoUCounts, LabelCounts, LabelMetrics, SegMetrics
from raysemiseg.labels import LabelSpace
from raysemiseg.train.data import iter_val_rows
from raysemiseg.train.loop import given_labels_vector, normalisation, predict_image, require_label_conditioned


@dataclass
class Sample:
    """One evaluated image: (H, W, 3) uint8 image, (H, W) int64 ground truth and prediction."""

    image_id: str
    image: np.ndarray
    target: np.ndarray
    pred: np.ndarray


@dataclass
class EvalResult:
    """Metrics of one method on one split.

    Attributes:
        metrics: the shared :class:`SegMetrics` (mIoU, per-class IoU, accuracies, counts).
        label_space: the space the ids refer to.
        num_images: images scored with a pixel mask.
        seconds: wall time of prediction (+ CRF).
        crf: whether dense-CRF post-processing was applied.
        samples: the first ``num_samples`` images for overlays.
        labels: image-level multi-label scores (F1) over the rows with a ``labels`` value (the
            only score of an image-level-only split); None when no row had one.
        flip: whether left-right flip test-time augmentation was applied.
    """

    metrics: SegMetrics
    label_space: LabelSpace
    num_images: int
    seconds: float
    crf: bool
    samples: list[Sample] = field(default_factory=list)
    labels: LabelMetrics | None = None
    flip: bool = False


def refine_with_crf(image: np.ndarray, logits: torch.Tensor, background_id: int | None, params: Any = None,
                    ids: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Dense-CRF labels from (P, H, W) logits over background + the predicted classes.

    Args:
        logits: (P, H, W) scores of the classes ``ids`` (all K classes when ``ids`` is None).
        ids: (P,) label-space ids of the rows of ``logits`` (ascending); None = ``0..P-1``.
            Softmax over a subset then restriction equals softmax over all K then restriction
            (the renormalisation cancels the partition function).

    Returns:
        (H, W) int64 label-space ids.
    """
    from raysemiseg.pseudolabel.crf import crf_labels, restrict_probs

    probs = torch.softmax(logits.float(), dim=0).cpu().numpy()
    row_ids = np.arange(probs.shape[0]) if ids is None else np.asarray(torch.as_tensor(ids).cpu(), np.int64)
    rows = set(np.unique(probs.argmax(0)).tolist())
    if background_id is not None and background_id in row_ids:
        rows.add(int(np.searchsorted(row_ids, background_id)))
    rows_arr = np.array(sorted(rows), dtype=np.int64)
    ids_arr = row_ids[rows_arr]
    if len(ids_arr) == 1:
        return np.full(image.shape[:2], ids_arr[0], np.int64)
    labels, _ = crf_labels(image, restrict_probs(probs, rows_arr), ids_arr, params)
    return labels


def evaluate_rows(method: torch.nn.Module, rows: Any, label_space: LabelSpace, *, device: str | torch.device = "cpu",
                  val_size: int | None = None, crf: bool = False, num_samples: int = 0,
                  desc: str = "eval", progress: bool = True, given_labels: bool = False,
                  score_space: LabelSpace | None = None, flip: bool = False) -> EvalResult:
    """mIoU of ``method`` over store ``rows`` (a pyarrow Table or a Ray dataset of store rows).

    Args:
        method: a :class:`~raysemiseg.methods.base.Method` (put in eval mode here).
        rows: store rows with ``image``, ``mask``, ``image_id`` columns.
        val_size: resize the long side before the forward pass (None = native).
        crf: dense-CRF post-processing.
        flip: left-right flip test-time augmentation (:func:`~raysemiseg.train.loop.predict_logits`;
            2x the forward cost), before the CRF when both are on.
        num_samples: how many (image, gt, prediction) triples to keep for overlays.
        given_labels: predict with each row's image-level labels (``rows`` needs a ``labels``
            column): TransferNet-GT, DecoupledNet with given labels.
        score_space: score in another label space: predictions and masks are both mapped with
            ``label_space.mapping_to(score_space)`` (classes without a counterpart become its
            background). WSSL Cross-Joint (Papandreou et al. 2015 Sec. 4.5) trains over the
            VOC + COCO union and is scored on VOC's 21 classes: a pixel predicted as a COCO-only
            class is a background prediction there. None = the run's own space.

    Raises:
        ValueError: ``given_labels`` for a method that is not label-conditioned.
    """
    if given_labels:
        require_label_conditioned(method)   # before any row is read
    dev = torch.device(device)
    method.to(dev).eval()
    mean, std = normalisation(method)
    scored = score_space or label_space
    lut = torch.from_numpy(label_space.mapping_to(score_space)) if score_space is not None else None
    cm = IoUCounts(scored.num_classes, scored.ignore_index, device=dev)
    lc = LabelCounts(scored.num_classes)
    samples: list[Sample] = []
    n = 0
    t0 = time.perf_counter()
    total = rows.num_rows if hasattr(rows, "num_rows") else None
    for row in tqdm(iter_val_rows(rows), total=total, desc=desc, unit="img", disable=not progress):
        if row["mask"] is None and row.get("labels") is None:
            continue
        p = predict_image(method, row["image"], mean, std, dev, val_size,
                          image_labels=given_labels_vector(method, row, given_labels), flip=flip)
        if row.get("labels") is not None:
            present, true = p.present.cpu(), torch.as_tensor([int(c) for c in row["labels"]], dtype=torch.int64)
            if lut is not None:  # foreground classes of the scoring space only
                present, true = lut[present], lut[true]
                bg = -1 if scored.background_id is None else scored.background_id
                fg = lambda t: t[(t < scored.num_classes) & (t != bg)]  # noqa: E731
                present, true = fg(present), fg(true)
            lc.update(present, true)
        if row["mask"] is None:
            continue
        if crf:
            pred = refine_with_crf(row["image"], p.scores, label_space.background_id, ids=p.ids)
        else:
            pred = p.label.cpu().numpy()
        p_t, m_t = torch.from_numpy(np.asarray(pred, np.int64)), torch.from_numpy(np.asarray(row["mask"], np.int64))
        if lut is not None:
            p_t, m_t = lut[p_t], lut[m_t]
        cm.update(p_t, m_t)
        if len(samples) < num_samples:
            samples.append(Sample(row["image_id"], row["image"], m_t.numpy(), p_t.numpy()))
        n += 1
    return EvalResult(cm.compute(), scored, n, time.perf_counter() - t0, crf, samples,
                      labels=lc.compute() if lc.num_images else None, flip=flip)


def evaluate_checkpoint(checkpoint: str | Path, store: str | Path, split: str = "val", *, crf: bool = False,
                        num_samples: int = 6, device: str | None = None, max_rows: int | None = None,
                        val_size: int | None = None, untrained_head: bool = False, progress: bool = True,
                        given_labels: bool | None = None, score_space: str | LabelSpace | None = None,
                        flip: bool = False) -> EvalResult:
    """Evaluate a checkpoint directory on a store split.

    Args:
        checkpoint: a checkpoint directory (``model.pt``, ``config.yaml``, ``meta.json``).
        store: image store directory.
        split: the store's ``split`` value to score.
        max_rows: score only the first N rows (smoke runs).
        val_size: long-side resize (default: the run's ``data.val_size``).
        untrained_head: keep the checkpoint's config and backbone initialisation but do not load
            its weights: the backbone gets its pretrained (ImageNet) weights and the head its
            random initialisation (seeded with ``run.seed``) -- the untrained baseline.
        given_labels: predict with each image's given image-level labels instead of the method's
            own classifier (TransferNet-GT, Hong et al. 2016 Sec. 4.3; label-conditioned methods
            only). None = the method's default (its ``use_gt_labels`` parameter).
        score_space: score in this label space (name, YAML path or LabelSpace; see
            :func:`evaluate_rows`), e.g. ``"voc21"`` for a Cross-Joint union-space checkpoint.
        flip: left-right flip test-time augmentation (:func:`evaluate_rows`).

    Raises:
        FileNotFoundError: not a checkpoint or not a store.
        ValueError: the split has no rows, the checkpoint's label space differs from the store's,
            or ``given_labels`` for a method that is not label-conditioned.
    """
    from raysemiseg.data.store import open_store
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import CONFIG_FILE, label_space_of, load_method, local_checkpoint, read_meta

    checkpoint = local_checkpoint(checkpoint)  # a checkpoint dir, a run folder, or a URI (file://, s3://...)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    st = open_store(store)
    meta = read_meta(checkpoint)
    space = label_space_of(meta)
    if tuple(space.names) != tuple(st.label_space.names):
        raise ValueError(f"checkpoint label space {space.name!r} ({space.num_classes} classes) differs from "
                         f"store {store}'s {st.label_space.name!r} ({st.label_space.num_classes} classes)")
    if untrained_head:
        from raysemiseg.config import load_config

        cfg = load_config(Path(checkpoint) / CONFIG_FILE)
        torch.manual_seed(cfg.run.seed)
        method = get_method(cfg.method.name)(space, cfg.model, cfg.method.build_params())
        method.set_stage(cfg.method.stage)
    else:
        method, cfg, _ = load_method(checkpoint, dev)
    rows = st.read_table(columns=["image_id", "image", "mask", "labels"], filter_split=split)
    if rows.num_rows == 0:
        raise ValueError(f"store {store} has no rows with split {split!r}")
    if max_rows is not None:
        rows = rows.slice(0, max_rows)
    return evaluate_rows(method, rows, space, device=dev, val_size=val_size or cfg.data.val_size, crf=crf,
                         num_samples=num_samples, progress=progress,
                         desc=f"eval {split}" + (" +flip" if flip else "") + (" +crf" if crf else ""),
                         given_labels=method.eval_with_given_labels if given_labels is None else given_labels,
                         score_space=_space(score_space), flip=flip)


def _space(space: str | LabelSpace | None) -> LabelSpace | None:
    if space is None or isinstance(space, LabelSpace):
        return space
    from raysemiseg.labels import load_label_space

    return load_label_space(space)
