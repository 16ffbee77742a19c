"""The Ray Train driver: one ``TorchTrainer`` for every method and config.

``train(cfg)`` validates the data plan on the driver (nothing heavy is read), builds the
``TorchTrainer`` from the config (``ScalingConfig``: workers, CPU/GPU, placement; gloo on CPU,
nccl on GPU), ``RunConfig(name, storage_path)`` with ``CheckpointConfig(num_to_keep,
checkpoint_score_attribute="val_score", order "max"; ``val_score`` is the val mIoU, or the
image-label F1 when the validation rows have no masks, see :attr:`raysemiseg.train.loop.ValMetrics.score`)`` and ``FailureConfig(max_failures)``, and the
MLflow callback of :mod:`raysemiseg.tune.tracking`. Rerunning with the same ``run.name`` and
``run.storage_path`` resumes from the latest checkpoint (Ray Train V2 restores the run's
checkpoint history from storage and ``ray.train.get_checkpoint()`` hands the latest one to the
workers), but only under the same config: the run folder keeps ``raysemiseg_run.json`` (the
config that started it and its digest, :func:`check_run_config`) and a rerun whose config differs
in anything but the keys of :data:`RESUMABLE_KEYS` is refused, naming the changed keys.

``run.storage_path`` may be a local path or a URI (``file://``, ``s3://``...): the run folder and
the checkpoints of :class:`TrainResult` are then URIs too (strings with the scheme), which every
checkpoint reader accepts (:func:`raysemiseg.train.checkpoint.local_checkpoint`). On a multi-node
cluster the store, split file, label store and storage path must be visible to every node
(:func:`raysemiseg.storage.require_shared_paths`, checked before any work starts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysemiseg import storage
from raysemiseg.config import ConfigError, TrainConfig, dotted
from raysemiseg.runtime import DATA_CPUS, CpuNeed, ensure_ray

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run leaves behind.

    Locations are strings: absolute local paths for a local ``run.storage_path``, URIs with
    their scheme (``file:///...``, ``s3://bucket/...``) for a URI one.

    Attributes:
        run_dir: ``storage_path/name`` (Ray Train's run folder with the checkpoints).
        best_checkpoint: directory of the kept checkpoint with the highest val mIoU (exact ties: the
            later one).
        latest_checkpoint: directory of the last reported checkpoint.
        metrics: the last reported metrics (rank 0).
        history: the metrics of the checkpoints Ray Train kept (``num_to_keep``, best by val
            mIoU); the full per-epoch curves are in MLflow.
        mlflow_run_id / tracking_uri: where the run is tracked (None when tracking is off).
        checkpoint: the checkpoint to hand on (an experiment's ``{prev}`` and final evaluation):
            ``best_checkpoint``, or ``latest_checkpoint`` for an auxiliary stage
            (:func:`checkpoint_rule`, :func:`select_checkpoint`).
        checkpoint_rule: ``"best"`` or ``"latest"``, the rule that chose ``checkpoint``.
    """

    run_dir: str
    best_checkpoint: str | None
    latest_checkpoint: str | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    checkpoint: str | None = None
    checkpoint_rule: str = "best"


def checkpoint_location(ckpt: Any, storage_path: str) -> str | None:
    """Where a Ray ``Checkpoint`` is, as the run's storage names it: its local path for a local
    ``storage_path``, else ``<scheme>://<path>`` (Ray keeps ``Checkpoint.path`` without the scheme,
    e.g. ``bucket/runs/r/checkpoint_...`` for ``s3://bucket/runs``)."""
    if ckpt is None:
        return None
    if not storage.is_uri(storage_path):
        return str(ckpt.path)
    scheme = storage_path.split("://", 1)[0]
    return f"{scheme}://{ckpt.path}"


RUN_FILE = "raysemiseg_run.json"
# keys a rerun may change and still resume: where it runs and how it is tracked, not what it trains;
# optim.epochs extends (or shortens) a finished run (resumes from its last epoch)
RESUMABLE_KEYS = ("optim.epochs", "run.max_failures", "run.inject_fault_at_step", "run.num_to_keep", "run.checkpoint_select",
                  "scaling.", "tracking.", "eval.")


def run_config_identity(cfg: TrainConfig) -> dict[str, str]:
    """The flattened config that identifies a run (everything but :data:`RESUMABLE_KEYS`), values
    as JSON text."""
    flat = dotted(cfg.model_dump(mode="json"))
    return {k: json.dumps(v, sort_keys=True) for k, v in sorted(flat.items())
            if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)}


def check_run_config(cfg: TrainConfig) -> str:
    """Record the config of a new run in ``<run dir>/raysemiseg_run.json``, or check a rerun against it.

    Returns:
        The config digest (SHA-256 of :func:`run_config_identity`, 16 hex digits).

    Raises:
        ConfigError: the run folder holds a run started with another config; names the changed
            keys with both values and says how to start a fresh run.
    """
    ident = run_config_identity(cfg)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = storage.join(run_location(cfg), RUN_FILE)
    if storage.exists(path, "file"):
        old = json.loads(storage.read_text(path))
        if old.get("digest") != digest:
            before = old.get("config", {})
            changed = sorted(k for k in set(before) | set(ident) if before.get(k) != ident.get(k))
            shown = "; ".join(f"{k}: {before.get(k, '(unset)')} -> {ident.get(k, '(unset)')}" for k in changed[:8])
            raise ConfigError(
                f"run {cfg.run.name!r} in {cfg.run.storage_path} was started with another config and would resume "
                f"from its checkpoints: {shown}{' ...' if len(changed) > 8 else ''}. Give the run a new run.name, "
                f"or delete {run_location(cfg)} to start it again.")
        return digest
    storage.write_text(path, json.dumps({"digest": digest, "config": ident}, indent=1, sort_keys=True))
    return digest


def run_location(cfg: TrainConfig) -> str:
    """``<run.storage_path>/<run.name>``: an absolute local path, or a URI for a URI storage path."""
    sp = cfg.run.storage_path
    if storage.is_uri(sp):
        return storage.join(sp, cfg.run.name)
    return str(Path(sp).resolve() / cfg.run.name)


def local_path(path: str) -> Path | None:
    """``path`` as a local absolute path, or None for URIs (``s3://``, ``gs://``...)."""
    return None if "://" in path and not path.startswith("file://") else Path(path.removeprefix("file://")).resolve()


def build_trainer(cfg: TrainConfig, *, callbacks: list[Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The ``TorchTrainer`` for ``cfg`` (Ray must be initialised) and its worker config.

    Raises:
        ValueError / FileNotFoundError: from the data plan (empty pools, missing split file...).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysemiseg.methods.base import get_method
    from raysemiseg.train.data import steps_per_epoch
    from raysemiseg.train.plan import build_datasets, describe_plan

    method_cls = get_method(cfg.method.name)
    plan = build_datasets(cfg, uses_boxes=method_cls.renders_boxes)
    log.info("data plan: %s", describe_plan(plan))
    steps = cfg.optim.steps_per_epoch or steps_per_epoch(
        plan.pool_rows, cfg.data.batch_size, cfg.data.strong_fraction, cfg.scaling.num_workers)
    local_root = local_path(cfg.run.storage_path)
    storage_str = str(local_root) if local_root is not None else cfg.run.storage_path
    fault_marker = None
    if cfg.run.inject_fault_at_step is not None:
        if local_root is None:
            raise ValueError("run.inject_fault_at_step (test only) needs a local run.storage_path")
        (local_root / cfg.run.name).mkdir(parents=True, exist_ok=True)
        fault_marker = str(local_root / cfg.run.name / ".fault_injected")
    worker_config = {"cfg": cfg.model_dump(mode="json"), "steps_per_epoch": steps, "fault_marker": fault_marker,
                     "pools": sorted(plan.pool_rows), "val": plan.val, "augment": plan.augment,
                     "label_space": {**plan.label_space.to_dict(), "name": plan.label_space.name}}
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1.0} if sc.use_gpu else {}), **sc.resources_per_worker}
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config=worker_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources, placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_str,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep,
                                               checkpoint_score_attribute="val_score", checkpoint_score_order="max"),
            callbacks=callbacks or None),
        datasets=plan.datasets,
        # every training pool is split over the workers (validation: plan.val); a single worker iterates its pools
        # directly (no streaming_split coordinator actor to start: ~2-3 s per run, README "make test")
        dataset_config=DataConfig(datasets_to_split="all" if sc.num_workers > 1 else []),
    )
    return trainer, worker_config


def cpu_need(cfg: TrainConfig) -> CpuNeed:
    """Logical CPUs a run of ``cfg`` needs at once: ``num_workers * cpus_per_worker`` held by the
    Train workers plus :data:`~raysemiseg.runtime.DATA_CPUS` for the Ray Data tasks feeding them."""
    sc = cfg.scaling
    return CpuNeed(held=sc.num_workers * sc.cpus_per_worker, data=DATA_CPUS, per_node=sc.cpus_per_worker,
                   what=f"train run {cfg.run.name!r} ({sc.num_workers} worker(s) x {sc.cpus_per_worker:g} CPUs)",
                   knobs="scaling.cpus_per_worker / scaling.num_workers")


CHECKPOINT_RULES = ("best", "latest")


def checkpoint_rule(cfg: TrainConfig) -> str:
    """How the run's checkpoint to hand on is chosen: ``"latest"`` when ``cfg.method.stage`` is one
    of the method's :attr:`~raysemiseg.methods.base.Method.AUX_STAGES` (L-Net, P-Net pre-training,
    attention or classifier pre-training: the segmenter their val mIoU scores is frozen or
    untrained), else ``"best"`` (highest val mIoU); ``run.checkpoint_select`` other than "auto" wins."""
    from raysemiseg.methods.base import get_method

    if cfg.run.checkpoint_select != "auto":
        return cfg.run.checkpoint_select
    return "latest" if cfg.method.stage in get_method(cfg.method.name).AUX_STAGES else "best"


def select_checkpoint(candidates: Sequence[tuple[Any, Mapping[str, Any]]], rule: str = "best",
                      latest: Any | None = None) -> Any | None:
    """The checkpoint a run hands on (``{prev}``, final evaluation).

    Args:
        candidates: ``[(checkpoint, metrics)]`` as Ray's ``Result.best_checkpoints`` (any order);
            ``metrics`` holds ``val_score`` (else ``val_miou``: older checkpoints) and ``global_step``
            (the list position stands in for a missing step).
        rule: ``"best"``: the highest ``val_score`` (NaN or missing = lowest), exact ties going to the
            later checkpoint (higher ``global_step``); ``"latest"``: ``latest`` when given (Ray's
            ``Result.checkpoint``), else the candidate with the highest ``global_step``.
        latest: Ray's latest checkpoint, if known.

    Returns:
        The chosen checkpoint object, or None when there is none.

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in CHECKPOINT_RULES:
        raise ValueError(f"checkpoint rule {rule!r}: valid are {list(CHECKPOINT_RULES)}")
    if rule == "latest" and latest is not None:
        return latest
    if not candidates:
        return None

    def step(i: int, m: Mapping[str, Any]) -> float:
        return float(m.get("global_step", i))

    def score(m: Mapping[str, Any]) -> float:
        v = m.get("val_score", m.get("val_miou"))
        return float("-inf") if v is None or math.isnan(float(v)) else float(v)

    if rule == "latest":
        key = lambda icm: (step(icm[0], icm[1][1]), icm[0])  # noqa: E731
    else:
        key = lambda icm: (score(icm[1][1]), step(icm[0], icm[1][1]), icm[0])  # noqa: E731
    return max(enumerate(candidates), key=key)[1][0]


def _train_fn(config: dict[str, Any]) -> None:
    from raysemiseg.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def finished_run(cfg: TrainConfig) -> TrainResult | None:
    """The result of a run whose checkpoints already cover ``cfg.optim.epochs``, read from its run
    folder (each checkpoint's ``meta.json``; local or URI), or None when there is none or it has
    epochs left. Lets a rerun of a finished run return at once instead of starting Ray and Ray
    Train's controller and workers only to find no step left (~15 s on 2 cores).

    ``metrics`` are the latest checkpoint's (the last epoch reported), ``history`` the kept
    checkpoints' metrics in time order; ``checkpoint`` follows :func:`checkpoint_rule`. A checkpoint
    without a readable ``meta.json`` (being written when a run was killed) is ignored.
    """
    from raysemiseg.train.checkpoint import read_meta, run_checkpoints

    kept: list[tuple[str, dict[str, Any]]] = []
    for loc in run_checkpoints(run_location(cfg)):
        try:
            kept.append((loc, dict(read_meta(loc).get("metrics") or {})))
        except (FileNotFoundError, ValueError):
            continue
    if not kept:
        return None
    latest, last = max(kept, key=lambda cm: (float(cm[1].get("global_step", -1)), cm[0]))
    if int(last.get("epoch", 0)) < cfg.optim.epochs:
        return None
    rule = checkpoint_rule(cfg)
    return TrainResult(run_dir=run_location(cfg), best_checkpoint=select_checkpoint(kept), latest_checkpoint=latest,
                       metrics=last, history=[m for _, m in kept],
                       checkpoint=select_checkpoint(kept, rule, latest), checkpoint_rule=rule)


def train(cfg: TrainConfig, *, tracker: Any | None = None, ray_address: str | None = None,
          num_cpus: int | None = None) -> TrainResult:
    """Train ``cfg`` on Ray Train and return where the checkpoints and metrics went.

    Args:
        cfg: the validated run config.
        tracker: a started :class:`raysemiseg.tune.tracking.Tracker` (default: one is made from
            ``cfg.tracking`` when enabled).
        ray_address: passed to :func:`ensure_ray`.
        num_cpus: logical CPUs of a local Ray started here (default: the run's :func:`cpu_need`,
            at least the cores).

    Raises:
        ValueError: the Ray CPU budget cannot fit the workers plus their data tasks
            (:func:`cpu_need`; fails at once instead of hanging), or a path other nodes of a
            multi-node cluster cannot see (:func:`raysemiseg.storage.check_shared_paths`).
        ConfigError: the run folder holds a run started with another config
            (:func:`check_run_config`).
        ray.train.TrainingFailedError: the workers failed more than ``run.max_failures`` times.
    """
    from raysemiseg.tune.tracking import Tracker

    done = finished_run(cfg)  # every epoch checkpointed already: neither Ray nor Ray Train is started
    if done is None:
        ensure_ray(ray_address, num_cpus, need=cpu_need(cfg))
        storage.require_shared_paths({"data.store": cfg.data.store, "data.split_file": cfg.data.split_file,
                                      "data.label_store": cfg.data.label_store, "run.storage_path": cfg.run.storage_path},
                                     what=f"training run {cfg.run.name!r}")
    check_run_config(cfg)
    own_tracker = tracker is None and cfg.tracking.enabled
    if own_tracker:
        tracker = Tracker.for_run(cfg)
        tracker.start()
    if done is not None:
        log.info("run %s: finished earlier (epoch %s of %s)", cfg.run.name, done.metrics.get("epoch"), cfg.optim.epochs)
        return _tracked(done, tracker, own_tracker)
    callbacks = [tracker.callback()] if tracker is not None else []
    trainer, _ = build_trainer(cfg, callbacks=callbacks)
    try:
        result = trainer.fit()
    except BaseException:
        if own_tracker:
            tracker.end("FAILED")
        raise
    sp = cfg.run.storage_path
    best = select_checkpoint(result.best_checkpoints or [])
    rule = checkpoint_rule(cfg)
    chosen = select_checkpoint(result.best_checkpoints or [], rule, result.checkpoint)
    history = []
    if result.metrics_dataframe is not None and len(result.metrics_dataframe):
        history = result.metrics_dataframe.to_dict("records")
    metrics = dict(result.metrics or {})
    best_loc = checkpoint_location(best, sp)
    if not metrics and best_loc is not None:  # nothing reported (no step left): take the checkpoint's
        from raysemiseg.train.checkpoint import read_meta

        metrics = read_meta(best_loc)["metrics"]
    out = TrainResult(run_dir=run_location(cfg), best_checkpoint=best_loc,
                      latest_checkpoint=checkpoint_location(result.checkpoint, sp), metrics=metrics, history=history,
                      checkpoint=checkpoint_location(chosen, sp), checkpoint_rule=rule)
    return _tracked(out, tracker, own_tracker)


def _tracked(out: TrainResult, tracker: Any | None, own_tracker: bool) -> TrainResult:
    """``out`` with the MLflow run it is tracked in; logs its checkpoints and ends a tracker ``train`` started."""
    if tracker is not None:
        out.mlflow_run_id, out.tracking_uri = tracker.run_id, tracker.tracking_uri
        tracker.log_checkpoint(out.best_checkpoint, out.latest_checkpoint)
        if own_tracker:
            tracker.end("FINISHED")
    return out
