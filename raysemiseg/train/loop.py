"""The one training loop (every method, through the :class:`~raysemiseg.methods.base.Method` protocol).

``train_loop_per_worker`` is what each Ray Train worker runs (see :mod:`raysemiseg.train.driver`):
build the method, optimizers (one per :meth:`Method.optimizer_groups` group), resume from
``ray.train.get_checkpoint()``, then per epoch :func:`train_one_epoch` + :func:`evaluate` and one
``ray.train.report`` (rank 0 attaches the checkpoint).

Optimisation (DeepLab, Chen et al. 2015; per-method overrides through optimizer groups):

* poly learning rate ``lr_t = lr_0 * (1 - t / T) ** power`` (power 0.9), ``t`` = global step,
  ``T`` = epochs * steps per epoch, applied to every parameter group's own initial lr;
* SGD momentum 0.9, weight decay 5e-4, or Adam (``optim.optimizer`` or the group's override);
* each group steps on the sum of its own losses: loss keys ``"group/name"`` go to ``group``,
  unprefixed keys to ``"main"``; gradients are taken with ``torch.autograd.backward(inputs=...)``
  w.r.t. the group's parameters only (so a discriminator loss never moves the segmenter and vice versa),
  averaged over workers by torch DDP, one ``DistributedDataParallel`` per group
  (:class:`GradSync`: bucketed all-reduce overlapped with the backward pass; parameters without
  a gradient count as zero, ones unused on every worker keep no gradient);
* AMP (float16 autocast + GradScaler) on CUDA when ``optim.amp``; ignored on CPU.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from raysemiseg.eval.metrics import IoUCounts, LabelCounts, LabelMetrics, SegMetrics
from raysemiseg.train.data import BatchSampler, collate, iter_val_rows, multi_hot_labels, prepare_eval_image

MAIN_GROUP = "main"


# ----------------------------------------------------------------------------------------------
# Optimizers and learning rate
# ----------------------------------------------------------------------------------------------


def build_optimizers(method: nn.Module, optim_cfg: Any) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per :meth:`Method.optimizer_groups` group.

    Args:
        method: the method (its ``optimizer_groups(lr)`` gives the groups).
        optim_cfg: :class:`raysemiseg.config.OptimConfig`.

    Raises:
        ValueError: an unknown optimizer kind or an empty group (names the group).
    """
    out: dict[str, torch.optim.Optimizer] = {}
    for g in method.optimizer_groups(optim_cfg.lr):
        kind = g.optimizer or optim_cfg.optimizer
        params = [pg for pg in g.params if pg["params"]]
        if not params:
            raise ValueError(f"optimizer group {g.name!r} has no trainable parameters")
        for pg in params:
            pg.setdefault("lr", optim_cfg.lr)
            pg["initial_lr"] = pg["lr"]
        if kind == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                                                         weight_decay=optim_cfg.weight_decay)
        elif kind == "adam":
            opt = torch.optim.Adam(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
        elif kind == "adamw":
            opt = torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
        else:
            raise ValueError(f"optimizer group {g.name!r}: unknown optimizer {kind!r}; valid: ['adam', 'adamw', 'sgd']")
        out[g.name] = opt
    return out


def poly_factor(step: int, total: int, power: float = 0.9) -> float:
    """DeepLab's poly schedule factor ``(1 - step / total) ** power``, clamped to [0, 1]."""
    return max(0.0, 1.0 - min(step, total) / max(total, 1)) ** power


def set_lr(optimizers: dict[str, torch.optim.Optimizer], factor: float) -> float:
    """Set every parameter group's lr to ``initial_lr * factor``; returns the first group's lr."""
    first = None
    for opt in optimizers.values():
        for pg in opt.param_groups:
            pg["lr"] = pg["initial_lr"] * factor
            first = pg["lr"] if first is None else first
    return float(first or 0.0)


def group_losses(losses: dict[str, Tensor], groups: Iterable[str]) -> dict[str, dict[str, Tensor]]:
    """Split ``{"group/name": loss, "name": loss}`` by optimizer group (unprefixed -> ``"main"``).

    Raises:
        ValueError: a key names a group the method did not declare (valid groups listed).
    """
    valid = list(groups)
    out: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in losses.items():
        group, _, name = key.rpartition("/")
        group = group or MAIN_GROUP
        if group not in valid:
            raise ValueError(f"loss {key!r} belongs to optimizer group {group!r}; the method's groups are {valid}")
        out[group][key] = value
    return dict(out)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GroupParams(nn.Module):
    """One optimizer group's parameters (the same ``Parameter`` objects, not copies) for DDP.

    ``forward(loss)`` returns ``loss`` unchanged: passing the group's summed loss through the DDP
    wrapper is what lets DDP find, from that loss's autograd graph, which of the group's parameters
    take part in this step (``find_unused_parameters``), whatever module computed it.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.group = nn.ParameterList(params)

    def forward(self, loss: Tensor) -> Tensor:
        return loss


class GradSync:
    """Per-optimizer-group gradient averaging over the workers with torch DDP.

    One :class:`torch.nn.parallel.DistributedDataParallel` per optimizer group (the group's
    trainable parameters, in a :class:`_GroupParams`), so each group's backward pass
    (``torch.autograd.backward(loss_g, inputs=group params)``, see :func:`train_step`) fires only
    that group's DDP hooks: bucketed all-reduce (25 MB buckets, gradients as bucket views)
    overlapped with the rest of the backward pass. ``find_unused_parameters=True`` gives the
    semantics of single-process training: a parameter without a gradient on a worker counts as
    zero in the average, and one without a gradient on *every* worker keeps ``grad=None`` (so
    momentum and weight decay leave it alone, e.g. a head a stage does not use).

    With one process (no ``torch.distributed`` group, or world size 1) nothing is wrapped and
    the backward passes are the plain ones.

    Args:
        optimizers: the run's optimizers (:func:`build_optimizers`); their order must be the same on
            every worker (it is: ``Method.optimizer_groups`` order).
        device: the worker's device (``device_ids`` of a CUDA DDP).

    Raises:
        ValueError: a parameter is in two groups (DDP would reduce it twice).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], device: torch.device | None = None) -> None:
        self.params: dict[str, list[Tensor]] = {
            name: [p for pg in opt.param_groups for p in pg["params"] if p.requires_grad]
            for name, opt in optimizers.items()}
        seen: dict[int, str] = {}
        for name, ps in self.params.items():
            for p in ps:
                if id(p) in seen:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is in optimizer groups "
                                     f"{seen[id(p)]!r} and {name!r}; each parameter belongs to one group")
                seen[id(p)] = name
        self.rank, self.world = _world()
        self.ddp: dict[str, nn.Module] = {}
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            cuda = device is not None and device.type == "cuda"
            for name, ps in self.params.items():
                if ps:
                    self.ddp[name] = DDP(_GroupParams(ps), device_ids=[device.index] if cuda else None,
                                         find_unused_parameters=True,
                                         gradient_as_bucket_view=True)

    @property
    def distributed(self) -> bool:
        """Whether gradients are averaged over more than one worker."""
        return bool(self.ddp)

    def attach(self, name: str, loss: Tensor) -> Tensor:
        """``loss`` of group ``name`` routed through the group's DDP (unchanged on one process):
        call right before that group's backward pass, once per step."""
        ddp = self.ddp.get(name)
        return loss if ddp is None else ddp(loss)


def broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (and buffers) to every worker (no-op on one process)."""
    _, world = _world()
    if world == 1:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for t in tensors:
        dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------------------------
# One step, one epoch, evaluation
# ----------------------------------------------------------------------------------------------


def train_step(method: nn.Module, batch: Any, optimizers: dict[str, torch.optim.Optimizer],
               scaler: torch.amp.GradScaler, *, amp: bool, grad_clip: float | None = None,
               sync: GradSync | None = None) -> dict[str, float]:
    """Forward, one backward pass per optimizer group (DDP-averaged over workers), step.

    Each group's backward is ``torch.autograd.backward(scale(loss_g), inputs=group params)``:
    a group's loss moves only its own parameters (a discriminator loss never moves the segmenter).
    All groups' gradients are taken before any optimizer steps (no in-place update under a live
    graph). Groups run in ``optimizers`` order, the same on every worker. On more than one worker
    every group with trainable parameters takes part in every step, so DDP's collectives always
    match: a group with no loss on this worker's batch gets a graph-attached zero (its
    parameters count as zero gradient in the average); on one worker such a group is not stepped.
    The GradScaler sees the same (averaged) gradients on every worker, so its inf checks, skipped
    steps and scale updates are identical everywhere.

    Args:
        batch: a :class:`~raysemiseg.methods.base.Batch` on the training device.
        sync: the run's :class:`GradSync` (built once, after the optimizers); None = one process.

    Returns:
        The loss values (floats), by loss key.

    Raises:
        ValueError: the method returned no losses, or ``sync`` is None on more than one worker.
        FloatingPointError: a loss is NaN/inf without AMP (names the losses and batch ids).
    """
    if sync is None:
        if _world()[1] > 1:
            raise ValueError("train_step on more than one worker needs the run's GradSync (sync=GradSync(optimizers))")
        sync = GradSync(optimizers)
    device_type = batch.images.device.type
    with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=amp):
        losses = method.compute_losses(batch)
    if not losses:
        raise ValueError(f"method {getattr(method, 'name', '?')!r} returned no losses")
    by_group = group_losses(losses, optimizers)
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not amp and not all(np.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"non-finite loss {values} on rows {batch.image_ids[:8]}")
    order = [g for g in optimizers if sync.params[g] and (g in by_group or g in sync.ddp)]
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    for i, gname in enumerate(order):
        params = sync.params[gname]
        terms = by_group.get(gname)
        total = sum(terms.values()) if terms else sum(p.sum() * 0.0 for p in params)
        torch.autograd.backward(scaler.scale(sync.attach(gname, total)), inputs=params,
                                retain_graph=i < len(order) - 1)
    for gname in order:
        opt = optimizers[gname]
        if grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(sync.params[gname], grad_clip)
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    return values


def train_one_epoch(method: nn.Module, sampler: BatchSampler, optimizers: dict[str, torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler, *, steps: int, start_step: int, total_steps: int,
                    poly_power: float, device: torch.device, amp: bool, grad_clip: float | None,
                    mean: Any, std: Any, fault_step: int | None = None, fault_marker: str | None = None,
                    warmup_steps: int = 2, sync: GradSync | None = None) -> dict[str, float]:
    """Run ``steps`` optimisation steps; returns averaged losses (``train/<name>``, ``train/loss``),
    the mean fraction of strong rows per batch (``train/strong_fraction``), lr and steady-state
    images/s.

    ``train_images_per_s`` counts only steps after the first ``warmup_steps`` (data pipeline
    start-up, allocator warm-up) when the epoch has more steps than that; over the same steps,
    ``time/data_wait_s`` (waiting for the sampler's rows), ``time/to_device_s`` (collate:
    normalise, stack, copy to the device) and ``time/step_s`` (:func:`train_step`) are the mean
    seconds per step (this worker's host clock).
    """
    method.train()
    sums: dict[str, float] = defaultdict(float)
    images = 0
    t_start = None
    lr = 0.0
    rank, _ = _world()
    timing: dict[str, float] = defaultdict(float)
    timed = 0
    for i in range(steps):
        step = start_step + i
        if fault_step is not None and step + 1 == fault_step and rank == 0 and fault_marker \
                and not Path(fault_marker).exists():
            Path(fault_marker).write_text(f"injected fault at step {fault_step}\n")
            # test-only: simulate a worker process crash. Ray Train V2's controller collects reports
            # on its health-check poll (every 2 s): wait three polls so the last checkpoint is
            # registered, as it would be for any crash that happens a while after a report.
            time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
            os._exit(17)
        if i == min(warmup_steps, steps - 1):
            t_start, images = time.perf_counter(), 0
        lr = set_lr(optimizers, poly_factor(step, total_steps, poly_power))
        t_a = time.perf_counter()
        rows = sampler.next()
        t_b = time.perf_counter()
        batch = collate(rows, mean, std, device)
        t_c = time.perf_counter()
        values = train_step(method, batch, optimizers, scaler, amp=amp, grad_clip=grad_clip, sync=sync)
        if t_start is not None:  # steady-state time split (host clock; the step syncs on its loss values)
            timing["data_wait_s"] += t_b - t_a
            timing["to_device_s"] += t_c - t_b
            timing["step_s"] += time.perf_counter() - t_c
            timed += 1
        for k, v in values.items():
            sums[k] += v
        sums["loss"] += sum(values.values())
        sums["strong_fraction"] += float(batch.is_strong.float().mean())
        images += batch.images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    out = {f"train/{k}": v / steps for k, v in sums.items()}
    out["lr"] = lr
    out["train_images_per_s"] = images / elapsed if elapsed > 0 else float("nan")
    out.update({f"time/{k}": v / max(timed, 1) for k, v in timing.items()})
    return out


@torch.no_grad()
def predict_logits(method: nn.Module, image: np.ndarray, mean: Any, std: Any, device: torch.device,
                   val_size: int | None = None, amp: bool = False,
                   image_labels: np.ndarray | None = None, flip: bool = False) -> Tensor:
    """Class scores of one image at its native size.

    Args:
        image: (H, W, 3) uint8 RGB.
        val_size: resize the long side to this before the forward pass (None = native).
        image_labels: optional (K,) multi-hot of the image's given labels
            (:func:`~raysemiseg.train.data.multi_hot_labels`), passed to a label-conditioned
            method's ``predict`` (TransferNet-GT, DecoupledNet with given labels).
        flip: left-right flip test-time augmentation: the image and its mirror go through the network as
            one batch of 2 and the mirror's logits, flipped back, are averaged with the image's (the
            standard multi-view test of DeepLab, Chen et al. 2018 Sec. 4.1; 2x the forward cost).

    Returns:
        (C, H, W) float32 logits (bilinearly resized back to the native size).
    """
    h, w = image.shape[:2]
    x = _eval_tensor(image, mean, std, device, val_size)
    n = 2 if flip else 1
    if flip:
        x = torch.cat([x, x.flip(-1)])
    kw = {} if image_labels is None else {"image_labels": torch.as_tensor(image_labels, dtype=torch.float32,
                                                                         device=device).unsqueeze(0).expand(n, -1)}
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        logits = method.predict(x, **kw).float()
    if flip:
        logits = 0.5 * (logits[:1] + logits[1:].flip(-1))
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0]


def _eval_tensor(image: np.ndarray, mean: Any, std: Any, device: torch.device, val_size: int | None) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H', W') normalised float32 on ``device`` (long side ``val_size``)."""
    x = prepare_eval_image(image, val_size)
    t = torch.from_numpy(np.array(x, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    return ((t - m) / s).unsqueeze(0)


@dataclass
class ImagePrediction:
    """One image's prediction at its native size (:func:`predict_image`).

    Attributes:
        label: (H, W) int64 label-space ids.
        ids: (P,) int64 label-space ids of the rows of ``scores`` (all K classes, or a method's
            candidate classes, see :meth:`CamClassifier.predict_classes`).
        scores: (P, H, W) float32 logits over ``ids``.
        present: (L,) int64 foreground ids predicted present in the image (the image-level
            prediction scored by :class:`~raysemiseg.eval.metrics.LabelCounts`).
    """

    label: Tensor
    ids: Tensor
    scores: Tensor
    present: Tensor


@torch.no_grad()
def predict_image(method: nn.Module, image: np.ndarray, mean: Any, std: Any, device: torch.device,
                  val_size: int | None = None, amp: bool = False,
                  image_labels: np.ndarray | None = None, flip: bool = False) -> ImagePrediction:
    """Label map, candidate-class scores and image-level labels of one image, O(P H W) when it can be.

    A method with ``predict_classes`` (the CAM classifier: returns a
    :class:`~raysemiseg.methods.cam_classifier.model.CandidateLogits`) gives dense logits over a few
    candidate classes only, and its image classifier (logit > 0) gives the present labels; any other method
    goes through :func:`predict_logits` (all K classes, present = foreground ids of the label map).

    Args:
        image: (H, W, 3) uint8 RGB.
        val_size: long-side resize before the forward pass (None = native).
        image_labels: optional (K,) multi-hot of given labels (label-conditioned methods, or the
            CAM classifier's candidates).
        flip: left-right flip test-time augmentation (:func:`predict_logits`). The CAM classifier's
            candidate path picks its candidates from one view and does not take it.

    Raises:
        ValueError: ``flip`` for a method with ``predict_classes`` (the CAM classifier).
    """
    h, w = image.shape[:2]
    bg = getattr(getattr(method, "label_space", None), "background_id", None)
    if hasattr(method, "predict_classes"):
        if flip:
            raise ValueError(f"flip test-time augmentation is not available for {getattr(method, 'name', 'this')!r} "
                             "(its candidate classes come from one view): evaluate it without flip")
        lab = None if image_labels is None else torch.as_tensor(image_labels, dtype=torch.float32,
                                                                 device=device).unsqueeze(0)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            cand = method.predict_classes(_eval_tensor(image, mean, std, device, val_size), image_labels=lab)
        scores = cand.logits.float()
        if scores.shape[-2:] != (h, w):
            scores = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
        return ImagePrediction(cand.ids[scores[0].argmax(0)], cand.ids, scores[0], cand.present(0))
    logits = predict_logits(method, image, mean, std, device, val_size, amp, image_labels, flip)
    label = logits.argmax(0)
    present = torch.unique(label)
    if bg is not None:
        present = present[present != bg]
    return ImagePrediction(label, torch.arange(logits.shape[0], device=logits.device), logits, present)


def require_label_conditioned(method: nn.Module) -> None:
    """Raises ValueError unless ``method.predict`` conditions on given image labels (``label_conditioned``)."""
    if not getattr(method, "label_conditioned", False):
        raise ValueError(f"method {getattr(method, 'name', type(method).__name__)!r} does not predict from given "
                         "image labels (only label-conditioned methods: transfernet, decoupled)")


def given_labels_vector(method: nn.Module, row: dict[str, Any], given_labels: bool) -> np.ndarray | None:
    """The (K,) multi-hot of ``row["labels"]`` when evaluating with given labels, else None.

    Raises:
        ValueError: ``given_labels`` for a method whose ``predict`` does not condition on labels
            (``label_conditioned`` False), or a row read without its ``labels`` column.
    """
    if not given_labels:
        return None
    require_label_conditioned(method)
    if row.get("labels") is None:
        raise ValueError(f"row {row.get('image_id')}: no 'labels' column to predict with given labels")
    bg = getattr(getattr(method, "label_space", None), "background_id", 0)
    return multi_hot_labels(row["labels"], method.num_classes, bg)


@dataclass
class ValMetrics:
    """Validation scores of one epoch, reduced over all workers.

    Attributes:
        seg: pixel metrics over the rows with a mask (``seg.num_pixels == 0`` when none had one).
        labels: image-level multi-label scores over the rows with a ``labels`` value.
        mask_images: rows scored with a pixel mask.
    """

    seg: SegMetrics
    labels: LabelMetrics
    mask_images: int

    @property
    def score(self) -> float:
        """The checkpoint score (``val_score``): val mIoU when any row had a pixel mask, else the
        image-level micro F1 (image-level-only validation, e.g. ImageNet-21k folders)."""
        return float(self.seg.miou) if self.seg.num_pixels > 0 else float(self.labels.micro_f1)


def evaluate(method: nn.Module, rows: Any, num_classes: int, ignore_index: int, device: torch.device, *,
             mean: Any, std: Any, val_size: int | None = None, amp: bool = False,
             given_labels: bool = False) -> ValMetrics:
    """Validation mIoU (rows with masks) and image-label F1 (rows with labels), reduced over all workers.

    State: two O(K) count sets (:class:`~raysemiseg.eval.metrics.IoUCounts`,
    :class:`~raysemiseg.eval.metrics.LabelCounts`), two all_reduces per call.

    Args:
        rows: the validation rows (:class:`~raysemiseg.train.plan.ValRows`: worker ``r`` reads
            its own files, or every worker reads all and scores rows ``i % world == r``; each row
            counts once), or any input of :func:`~raysemiseg.train.data.iter_val_rows`.
        given_labels: predict with each row's image-level labels (label-conditioned methods;
            the rows need a ``labels`` column).

    Returns:
        :class:`ValMetrics` over all workers' rows.
    """
    method.eval()
    rank, world = _world()
    cm = IoUCounts(num_classes, ignore_index, device=device)
    lc = LabelCounts(num_classes, device=device)
    masks = 0
    for row in iter_val_rows(rows, rank, world):
        if row["mask"] is None and row.get("labels") is None:
            continue
        pred = predict_image(method, row["image"], mean, std, device, val_size, amp,
                             given_labels_vector(method, row, given_labels))
        if row["mask"] is not None:
            cm.update(pred.label, torch.from_numpy(row["mask"]).to(device))
            masks += 1
        if row.get("labels") is not None:
            lc.update(pred.present, [int(c) for c in row["labels"]])
    cm.reduce_from_all_processes()
    lc.reduce_from_all_processes()
    n = torch.tensor([masks], dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(n)
    return ValMetrics(cm.compute(), lc.compute(), int(n))


def count_nodes(device: torch.device) -> int:
    """Number of distinct Ray nodes (by node id) hosting the worker group (one all_gather).

    Node ids, not IPs: several raylets on one machine (a test cluster) count as several nodes.
    """
    import ray

    _, world = _world()
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, node)
    return len(set(ids))


def normalisation(method: nn.Module) -> tuple[Any, Any]:
    """The backbone's RGB (mean, std) in [0, 1] (``method.backbone.mean/std``).

    Raises:
        AttributeError: the method registers no ``backbone`` (see the Method docstring).
    """
    bb = getattr(method, "backbone", None)
    if bb is None or not hasattr(bb, "mean"):
        raise AttributeError(f"method {getattr(method, 'name', '?')!r} has no .backbone with mean/std")
    return tuple(float(v) for v in bb.mean), tuple(float(v) for v in bb.std)


#: above this many classes, per-class figures are not reported as metric keys (one key per class
#: into Ray Train / Tune's progress.csv / MLflow); they go to the per-class table only
PER_CLASS_KEYS_MAX = 256
#: the per-class table's file name in each checkpoint (MLflow: ``per_class/epoch_<n>.csv``)
PER_CLASS_TABLE = "val_per_class.csv"


def epoch_metrics(val: ValMetrics, label_space: Any) -> dict[str, float]:
    """Flat scalar val metrics for ``ray.train.report``.

    Keys: ``val_score`` (the checkpoint score, :attr:`ValMetrics.score`), ``val_miou``,
    ``val_pixel_acc``, ``val_mean_acc`` (NaN without masks), ``val_f1`` (micro), ``val_macro_f1``,
    ``val_precision``, ``val_recall`` (image-level labels), ``val_mask_images``,
    ``val_label_images``; plus ``val_iou/<class>`` of the present classes when the space has at
    most :data:`PER_CLASS_KEYS_MAX` classes (larger spaces: :func:`per_class_table` only).
    """
    seg, lab = val.seg, val.labels
    out = {"val_score": val.score, "val_miou": float(seg.miou), "val_pixel_acc": float(seg.pixel_acc),
           "val_mean_acc": float(seg.mean_acc), "val_f1": float(lab.micro_f1), "val_macro_f1": float(lab.macro_f1),
           "val_precision": float(lab.precision), "val_recall": float(lab.recall),
           "val_mask_images": val.mask_images, "val_label_images": lab.num_images}
    if label_space.num_classes <= PER_CLASS_KEYS_MAX:
        for k in np.flatnonzero(np.isfinite(seg.iou)):
            out[f"val_iou/{label_space.names[k]}"] = float(seg.iou[k])
    return out


def per_class_table(val: ValMetrics, label_space: Any) -> str:
    """CSV of the per-class figures, one row per class with any pixel or image count (O(present)).

    Columns: ``class_id, class, iou, acc, tp_pixels, gt_pixels, pred_pixels, f1, tp_images,
    gt_images, pred_images`` (empty cells for undefined ratios).
    """
    import csv
    import io

    seg, lab = val.seg, val.labels
    used = np.flatnonzero((seg.gt_pixels + seg.pred_pixels + lab.gt_images + lab.pred_images) > 0)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["class_id", "class", "iou", "acc", "tp_pixels", "gt_pixels", "pred_pixels", "f1", "tp_images",
                 "gt_images", "pred_images"])

    def num(v: float) -> str:
        return "" if not np.isfinite(v) else f"{v:.6f}"

    for k in used:
        wr.writerow([int(k), label_space.names[k], num(seg.iou[k]), num(seg.acc[k]), int(seg.tp[k]),
                     int(seg.gt_pixels[k]), int(seg.pred_pixels[k]), num(lab.f1[k]), int(lab.tp[k]),
                     int(lab.gt_images[k]), int(lab.pred_images[k])])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The Ray Train worker function
# ----------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry (``TorchTrainer(train_loop_per_worker, train_loop_config=config)``).

    Args:
        config: {"cfg": TrainConfig as a JSON dict, "steps_per_epoch": int,
            "fault_marker": path or None (test-only fault injection marker)}.
    """
    import ray.train
    import ray.train.torch

    from raysemiseg.config import load_config
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import label_space_of, load_train_state, save_checkpoint

    from raysemiseg.train.data import quiet_ray_data

    quiet_ray_data()
    cfg = load_config(config["cfg"])
    space = label_space_of({"label_space": config["label_space"]})
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed + rank)

    method = get_method(cfg.method.name)(space, cfg.model, cfg.method.build_params())
    method.set_stage(cfg.method.stage)
    method.to(device)
    broadcast_state(method)
    mean, std = normalisation(method)
    optimizers = build_optimizers(method, cfg.optim)
    amp = bool(cfg.optim.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    start_epoch, global_step = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_train_state(d, method, optimizers, scaler, device)
        start_epoch, global_step = state["epoch"], state["global_step"]
    sync = GradSync(optimizers, device)  # DDP per optimizer group (after the resume: same weights everywhere)

    steps = int(config["steps_per_epoch"])
    total_steps = steps * cfg.optim.epochs
    names = ["train"] if cfg.data.strong_fraction is None else [
        n for n in ("train_strong", "train_weak") if n in config["pools"]]
    sampler = BatchSampler({n: ray.train.get_dataset_shard(n) for n in names}, cfg.data.batch_size,
                           cfg.data.strong_fraction, cfg.data.shuffle_buffer, seed=cfg.run.seed + 1000 * rank,
                           augment=config.get("augment"))
    val_shard = config["val"]        # ValRows: each worker scans its share of the store (plan.ValRows)
    num_nodes = count_nodes(device)

    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        train_metrics = train_one_epoch(
            method, sampler, optimizers, scaler, steps=steps, start_step=global_step, total_steps=total_steps,
            poly_power=cfg.optim.poly_power, device=device, amp=amp, grad_clip=cfg.optim.grad_clip,
            mean=mean, std=std, fault_step=cfg.run.inject_fault_at_step, fault_marker=config.get("fault_marker"),
            sync=sync)
        global_step += steps
        broadcast_state(method, buffers_only=True)  # BN statistics of rank 0 everywhere (what is saved)
        val = evaluate(method, val_shard, space.num_classes, space.ignore_index, device, mean=mean, std=std,
                       val_size=cfg.data.val_size, amp=amp, given_labels=method.eval_with_given_labels)
        metrics = {"epoch": epoch + 1, "global_step": global_step, "resumed_from_epoch": start_epoch,
                   "num_workers": ctx.get_world_size(), "num_nodes": num_nodes, **train_metrics,
                   **epoch_metrics(val, space), "epoch_time_s": time.perf_counter() - t0}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, method, cfg, space, optimizers=optimizers, scaler=scaler, epoch=epoch + 1,
                                global_step=global_step, metrics=metrics)
                Path(tmp, PER_CLASS_TABLE).write_text(per_class_table(val, space))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
