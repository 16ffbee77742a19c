"""Ray Tune sweeps around the one training driver (``raysemiseg tune SWEEP.yaml``).

Ray 2.60 pattern (Train V2 + Tune): ``Tuner(driver_fn, param_space, tune_config=TuneConfig(
scheduler=ASHAScheduler(metric="val_miou", mode="max"), max_concurrent_trials=...))``; each trial
runs :func:`run_trial`, which builds the run's ``TorchTrainer`` with
:func:`raysemiseg.train.driver.build_trainer` and ``RunConfig(callbacks=[TuneReportCallback(),
<MLflow callback>])`` so every epoch's rank-0 report (``val_miou``, ``val_iou/<class>``...) reaches
Tune (for ASHA) and MLflow. One Tune iteration = one epoch; ASHA's ``max_t`` defaults to
``optim.epochs`` of the base config.

A sweep file (``configs/sweeps/*.yaml``)::

    name: wssl_bias                      # sweep name: Tune experiment, MLflow parent run
    base: ../methods/wssl_fixed_semi.yaml   # a TrainConfig YAML (path relative to this file)
    overrides: {optim.epochs: 3}         # dotted-key overrides of the base, applied to every trial
    search_space:                        # dotted TrainConfig keys, or free variables (no dot)
      method.params.b_bg: {grid: [2.0, 3.0]}
      b_diff: {grid: [1.0, 2.0, 3.0]}     # free variable: only used by `derived`
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    derived:                             # key = sum of other sampled values
      method.params.b_fg: {sum: [method.params.b_bg, b_diff]}
    num_samples: 1                       # repeats of the grid (random dims resampled)
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
    resources: {driver_cpus: 0.0, data_cpus: 1.0, max_concurrent_trials: null}

Dimension kinds: ``grid`` (every value, crossed with the other grids), ``choice`` (random pick),
``uniform`` / ``loguniform`` ([low, high]), ``randint`` ([low, high), integers).

Resource budget (no deadlock on a small cluster), :func:`trial_resources`: a trial holds
``driver_cpus`` (the Tune trial process, which only waits on the trainer; 0 CPUs and
``driver_memory_mb`` by default, because a fractional CPU there would leave less than one whole
CPU for a Data task on a small machine and deadlock it), its Train workers
(``scaling.num_workers`` x (``cpus_per_worker`` CPUs, 1 GPU with ``use_gpu``, and
``resources_per_worker``); the Train controller takes 0 CPUs), and must leave ``data_cpus`` free
for its Ray Data read/augment tasks. :func:`plan_concurrency` divides a cluster's resources by
that, resource by resource: the autoscaler's maximum (``cluster.yaml``'s ``max_workers`` of each
node type) when the cluster has one, else the cluster as it is now. When the cluster cannot hold
one trial now but may grow, it warns and leaves the trials to Tune's queue; ``max_concurrent_trials``
caps the result, and a cap or a trial that can never fit is an error before any work starts. On a
2-CPU machine with one 1-CPU worker this gives 1 trial at a time.

Storage: ``storage_path`` (or the base's ``run.storage_path``) may be a URI (``s3://...``,
``file://...``): Tune's experiment, the trials' Train runs and ``best.yaml`` go there; MLflow then
needs ``tracking.tracking_uri`` (the embedded SQLite store needs a local folder). On a cluster
spanning several hosts the MLflow store must be a server (trials log from any node) and local
paths must be shared (:mod:`raysemiseg.storage`).

MLflow (through :mod:`raysemiseg.tune.tracking`): one parent run per sweep (the sweep file as
params and artifact, the results table, the best config, ``best_<metric>``), one child run per
trial (``mlflow.parentRunId``; the trial's resolved config as params, free variables as
``sweep.<name>``, per-epoch curves, the final per-class IoU as metrics and ``final_iou.txt``).
Trials stopped early by ASHA are closed as ``KILLED`` with tag ``raysemiseg.early_stopped``.
The best trial's full config is written to ``<sweep dir>/best.yaml`` (``run.name = <name>-best``,
the base's storage path), a file ``raysemiseg train`` accepts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from raysemiseg import storage
from raysemiseg.config import ConfigError, StrictModel, TrainConfig, dump_config, load_config

log = logging.getLogger(__name__)

DIM_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SchedulerConfig(StrictModel):
    """Trial scheduler: ASHA (Li et al. 2020) on ``metric`` or FIFO (no early stopping)."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="max epochs per trial (None = optim.epochs)")


class SweepResources(StrictModel):
    """Per-trial resource budget (see the module docstring)."""

    driver_cpus: float = Field(0.0, ge=0.0, description="CPUs of the Tune trial process (0: it only waits)")
    driver_memory_mb: int = Field(256, ge=1, description="memory reserved for the trial process (the whole "
                                  "request when driver_cpus is 0: Tune needs a non-empty resource request)")
    data_cpus: float = Field(1.0, ge=0.0, description="CPUs kept free per trial for Ray Data reads")
    max_concurrent_trials: int | None = Field(None, ge=1, description="cap; None = as many as fit")
    local_num_cpus: int | None = Field(
        None, ge=2, description="logical CPUs of the local Ray a sweep starts when no cluster is given; None = "
                                "cores + 1 (slack for Ray Data's tasks next to the Train worker)")


class LabelSweepDef(StrictModel):
    """What a pseudo-label sweep (``kind: pseudolabel``) scores: the labels its recipe gives the
    images of ``split`` that have a ground-truth pixel mask (relative paths: the caller's folder)."""

    store: str = Field(..., description="image store folder")
    split: str = Field("val", description="store split whose images with a pixel mask are labelled and scored")
    max_rows: int | None = Field(48, ge=1, description="the first N such images (store order); None = all")
    checkpoint: str | None = Field(None, description="checkpoint of the recipe's model stages (the CAM classifier): "
                                                     "a checkpoint dir or a training run folder (its newest)")
    stage_checkpoints: dict[str, str] = Field(default_factory=dict, description="{stage: checkpoint}, e.g. lnet_map")
    cpus_per_trial: float = Field(1.0, gt=0.0, description="CPUs of one trial (the recipe runs in its process)")
    experiment: str = Field("raysemiseg-label-sweeps", description="MLflow experiment")
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else SQLite in the sweep root")


class SweepConfig(StrictModel):
    """A sweep file (``raysemiseg tune SWEEP.yaml``)."""

    name: str
    kind: Literal["train", "pseudolabel"] = Field(
        "train", description="train: one Ray Train run per trial; pseudolabel: one pseudo-label recipe run per "
                             "trial, scored against ground truth (see raysemiseg.tune.label_sweep)")
    base: str = Field(description="TrainConfig YAML (kind train) or recipe YAML (kind pseudolabel), relative to "
                                  "the sweep file")
    labels: LabelSweepDef | None = Field(None, description="kind pseudolabel: the store, rows and checkpoints")
    overrides: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, dict[str, Any]]
    derived: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    metric: str = "val_miou"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: SweepResources = SweepResources()
    storage_path: str | None = Field(None, description="sweep folder root (None = <base run.storage_path>/sweeps; "
                                                            "kind pseudolabel: runs/sweeps)")

    @model_validator(mode="before")
    @classmethod
    def _label_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "pseudolabel":
            data = {"metric": "label_miou", "scheduler": {"name": "fifo"}, **data}
        return data

    @model_validator(mode="after")
    def _kind(self) -> SweepConfig:
        if self.kind == "pseudolabel":
            if self.labels is None:
                raise ValueError("kind pseudolabel needs a 'labels' section (store, split, checkpoint)")
            if self.scheduler.name != "fifo":
                raise ValueError("kind pseudolabel: a trial reports once, so early stopping does not apply; "
                                 "use scheduler {name: fifo}")
        elif self.labels is not None:
            raise ValueError("'labels' is only for kind pseudolabel")
        return self

    @field_validator("search_space")
    @classmethod
    def _dims(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("search_space is empty")
        for key, dim in v.items():
            if len(dim) != 1 or next(iter(dim)) not in DIM_KINDS:
                raise ValueError(f"search_space.{key}: one of {list(DIM_KINDS)} expected, got {sorted(dim)}")
            kind, arg = next(iter(dim.items()))
            if not isinstance(arg, list) or not arg:
                raise ValueError(f"search_space.{key}.{kind}: a non-empty list expected")
            if kind in ("uniform", "loguniform", "randint") and len(arg) != 2:
                raise ValueError(f"search_space.{key}.{kind}: [low, high] expected, got {arg}")
            if kind == "loguniform" and min(arg) <= 0:
                raise ValueError(f"search_space.{key}.loguniform: bounds must be > 0, got {arg}")
        return v

    @field_validator("derived")
    @classmethod
    def _derived(cls, v: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
        for key, rule in v.items():
            if list(rule) != ["sum"] or not rule["sum"]:
                raise ValueError(f"derived.{key}: only {{sum: [keys...]}} is supported, got {rule}")
        return v


# ----------------------------------------------------------------------------------------------
# pure helpers (no Ray)
# ----------------------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepConfig, dict[str, Any]]:
    """Read and validate a sweep file and its base config, before any work starts.

    ``overrides``: dotted keys of the sweep file (``raysemiseg tune --set labels.checkpoint=DIR``).

    Every search-space value is checked against the TrainConfig (unknown keys, wrong types,
    invalid method params fail here, naming the key); grids are checked value by value, ranges at
    both ends.

    Returns:
        (sweep, base): the sweep config and the base TrainConfig (kind train) or recipe (kind
        pseudolabel) as a plain dict (overrides applied, local paths absolute).

    Raises:
        FileNotFoundError: the sweep file or its base does not exist.
        ConfigError: invalid sweep file, base config or search-space value.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    for key, value in (overrides or {}).items():
        node = raw
        head, _, rest = key.partition(".")
        # sections whose own keys are dotted config keys: overrides.optim.lr -> raw["overrides"]["optim.lr"]
        *parents, leaf = [head, rest] if head in ("overrides", "search_space", "derived") and rest else key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{p}: --set {key}: {part!r} is not a mapping")
        node[leaf] = value
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{p}: invalid sweep"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for key in sweep.derived:   # one check for both kinds, before either base is read
        if "." not in key:
            raise ConfigError(f"{p}: derived.{key}: the target must be a dotted config key")
        for src in sweep.derived[key]["sum"]:
            if src not in sweep.search_space:
                raise ConfigError(f"{p}: derived.{key}: {src!r} is not a search_space key")
    base_path = Path(sweep.base) if Path(sweep.base).is_absolute() else p.parent / sweep.base
    if sweep.kind == "pseudolabel":
        from raysemiseg.tune.label_sweep import load_label_base

        return load_label_sweep_checked(p, sweep, load_label_base(base_path, sweep))
    base_cfg = load_config(base_path, overrides=sweep.overrides)
    base = base_cfg.model_dump(mode="json")
    # trials run in Tune's trial folders: relative local paths are the caller's, made absolute here
    for section, key in (("data", "store"), ("data", "split_file"), ("data", "label_store"),
                         ("model", "weights_path"), ("run", "storage_path")):
        v = base[section].get(key)
        if isinstance(v, str) and v and "://" not in v and not Path(v).is_absolute():
            base[section][key] = str(Path(v).resolve())
    for values in probe_values(sweep):
        try:
            trial_config(base, values, sweep.derived, run_name="probe", storage_path=base["run"]["storage_path"])
        except ConfigError as e:
            raise ConfigError(f"{p}: search space value {values} is invalid:\n{e}") from None
    return sweep, base


def load_label_sweep_checked(p: Path, sweep: SweepConfig, base: dict[str, Any]) -> tuple[SweepConfig, dict[str, Any]]:
    """Validate every probe point of a pseudo-label sweep against its recipe (see load_sweep)."""
    from raysemiseg.tune.label_sweep import label_trial_recipe

    for values in probe_values(sweep):
        try:
            label_trial_recipe(base, values, sweep.derived)
        except ValueError as e:
            raise ConfigError(f"{p}: search space value {values} is invalid:\n{e}") from None
    return sweep, base


def probe_values(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Sample points that cover every grid/choice value and both ends of every range (validation)."""
    first = {k: _dim_points(d)[0] for k, d in sweep.search_space.items()}
    out = [first]
    for k, d in sweep.search_space.items():
        for v in _dim_points(d)[1:]:
            out.append({**first, k: v})
    return out


def _dim_points(dim: dict[str, Any]) -> list[Any]:
    kind, arg = next(iter(dim.items()))
    if kind == "randint":
        return [int(arg[0]), int(arg[1]) - 1]
    return list(arg)


def resolve_values(sampled: dict[str, Any], derived: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """Sampled values plus the derived ones (``{"sum": [a, b]}`` -> ``a + b``)."""
    out = dict(sampled)
    for key, rule in derived.items():
        out[key] = sum(out[k] for k in rule["sum"])
    return out


def trial_config(base: dict[str, Any], values: dict[str, Any], derived: dict[str, dict[str, list[str]]] | None = None,
                 *, run_name: str, storage_path: str, tracking_uri: str | None = None,
                 experiment: str | None = None) -> TrainConfig:
    """The TrainConfig of one trial: ``base`` + the dotted keys of ``values`` (+ derived), with the
    trial's run name/storage (and tracking store). Free variables (no dot) are not applied.

    Raises:
        ConfigError: the resulting config is invalid (names the key).
    """
    vals = resolve_values(values, derived or {})
    overrides = {k: v for k, v in vals.items() if "." in k}
    overrides.update({"run.name": run_name, "run.storage_path": storage_path})
    if tracking_uri is not None:
        overrides["tracking.tracking_uri"] = tracking_uri
    if experiment is not None:
        overrides["tracking.experiment"] = experiment
    import copy

    return load_config(copy.deepcopy(base), overrides=overrides)


def trial_resources(base: dict[str, Any], res: SweepResources) -> dict[str, float]:
    """Resources one trial needs (see the module docstring): ``{"CPU": driver + workers x
    cpus_per_worker + data, "GPU": workers (use_gpu), <custom>: workers x amount}``, zero entries
    left out. Memory is not counted (Ray schedules the trial process's ``driver_memory_mb`` itself)."""
    sc = base["scaling"]
    n = int(sc["num_workers"])
    need = {"CPU": res.driver_cpus + n * float(sc["cpus_per_worker"]) + res.data_cpus,
            "GPU": float(n) if sc.get("use_gpu") else 0.0}
    for k, v in (sc.get("resources_per_worker") or {}).items():
        need[k] = need.get(k, 0.0) + n * float(v)
    return {k: v for k, v in need.items() if v > 0}


def trial_cpus(base: dict[str, Any], res: SweepResources) -> float:
    """CPUs one trial needs: Tune driver + Train workers + Data reserve."""
    return trial_resources(base, res).get("CPU", 0.0)


def local_cpus(res: SweepResources, need: Any | None = None) -> int:
    """Logical CPUs of a local Ray started for a sweep: ``res.local_num_cpus``, else cores + 1,
    raised to ``ceil(need.total)`` (one trial: a :class:`raysemiseg.runtime.CpuNeed`)."""
    import os

    default = max(os.cpu_count() or 1, 2) + 1
    return res.local_num_cpus or (max(default, math.ceil(need.total - 1e-9)) if need is not None else default)


def trial_cpu_need(base: dict[str, Any], res: SweepResources, sweep_name: str) -> Any:
    """:func:`trial_cpus` as a :class:`raysemiseg.runtime.CpuNeed` (for :func:`~raysemiseg.runtime.ensure_ray`)."""
    from raysemiseg.runtime import CpuNeed

    sc = base["scaling"]
    return CpuNeed(held=res.driver_cpus + sc["num_workers"] * sc["cpus_per_worker"], data=res.data_cpus,
                   per_node=sc["cpus_per_worker"], what=f"one trial of sweep {sweep_name!r}",
                   knobs="the base config's scaling.cpus_per_worker / scaling.num_workers, resources.data_cpus, "
                         "resources.local_num_cpus")


def state_api_address() -> str | None:
    """The State API (dashboard) URL of the cluster this process is connected to
    (``ray.init().address_info["webui_url"]``, here read from the connected node), or None when
    that cluster has no dashboard; asking it, not Ray's auto-detection, keeps the check on this
    process's cluster when other Ray instances run on the host."""
    import ray

    url = ray._private.worker.global_worker.node.address_info.get("webui_url")
    return f"http://{url}" if url and "://" not in url else (url or None)


def require_state_api(timeout_s: float = 15.0) -> None:
    """Fail fast when the connected Ray has no State API (no dashboard).

    A trial the scheduler stops (ASHA, or ``max_t``) ends its Train controller without a graceful
    shutdown; Ray Train V2's detached ``PlacementGroupCleaner`` then frees the workers' placement
    group, but it finds the dead controller through the State API, which the dashboard serves.
    Without it the stopped trial's CPUs stay reserved for good and, on a small cluster, the next
    trial waits forever with every process idle (seen on 2 CPUs: the 2nd trial of wssl_bias).

    The State API of the cluster this process is connected to is asked (:func:`state_api_address`).

    Raises:
        RuntimeError: the State API did not answer within ``timeout_s`` seconds; says how to
            start a cluster with the dashboard.
    """
    from ray.util.state import list_actors

    try:
        address = state_api_address()
        if not address:
            raise ConnectionError("the connected cluster has no dashboard (webui_url is empty)")
        list_actors(address=address, limit=1, timeout=int(timeout_s), raise_on_missing_output=False)
    except Exception as e:  # RayStateApiException, ConnectionError, ValueError (no dashboard in GCS)...
        raise RuntimeError(
            "a Tune sweep needs Ray's State API (served by the dashboard): without it Ray Train cannot free the "
            "workers of a trial the scheduler stopped, and the next trial waits forever. Start the cluster with the "
            "dashboard (`ray start --head --include-dashboard=true --dashboard-host=127.0.0.1`, or leave "
            f"--address unset for a local one). State API error: {type(e).__name__}: {str(e)[:200]}") from e


def _fits(have: dict[str, float], need: dict[str, float]) -> int:
    """Whole trials of ``need`` that ``have`` holds (the scarcest resource decides)."""
    n = 1_000_000
    for k, v in need.items():
        n = min(n, int(math.floor(float(have.get(k, 0.0)) / v + 1e-9)))
    return n


def plan_concurrency(cluster: dict[str, float], need: dict[str, float], cap: int | None = None,
                     max_cluster: dict[str, float] | None = None) -> int | None:
    """``max_concurrent_trials`` for Tune: how many trials of ``need`` may run at once without
    starving Ray Data (see the module docstring).

    Args:
        cluster: the cluster's resources now (``ray.cluster_resources()``).
        need: one trial's resources (:func:`trial_resources`).
        cap: ``resources.max_concurrent_trials`` (None: no cap).
        max_cluster: the most the cluster can grow to (the autoscaler's maximum, e.g.
            ``ray._private.state.state.get_max_resources_from_cluster_config()``), or None when
            unknown (no autoscaler: the cluster is taken as it is now).

    Returns:
        The number of concurrent trials, or ``cap`` (None when unset) when the cluster cannot
        hold one trial now and its maximum is unknown: Tune then queues the trials until nodes
        join (a warning says so).

    Raises:
        ValueError: one trial can never fit (``max_cluster`` known, or no way to grow: a trial
            needs a resource neither has), or ``cap`` exceeds what fits; the message gives the
            numbers.
    """
    def show(d: dict[str, float]) -> str:
        return "{" + ", ".join(f"{k}: {d.get(k, 0.0):g}" for k in need) + "}"

    limit = ({k: max(float(cluster.get(k, 0.0)), float(max_cluster.get(k, 0.0))) for k in need}
             if max_cluster else cluster)
    fits = _fits(limit, need)
    where = "the autoscaler's maximum" if max_cluster else "the cluster"
    if fits < 1 and max_cluster:
        raise ValueError(f"one trial needs {show(need)} but {where} is {show(max_cluster)}: it can never run")
    if fits < 1:
        log.warning("one trial needs %s but the cluster has %s now: the trials wait in Tune's queue until nodes "
                    "join (an autoscaling cluster adds them on demand)", show(need), show(cluster))
        return cap
    if _fits(cluster, need) < 1:
        log.warning("one trial needs %s and the cluster has %s now: the first trials wait for the autoscaler",
                    show(need), show(cluster))
    if cap is not None and cap > fits:
        raise ValueError(f"resources.max_concurrent_trials={cap} but only {fits} trials of {show(need)} fit in "
                         f"{where} {show(limit)} without starving Ray Data reads")
    return min(fits, cap or fits)


def cluster_plan(need: dict[str, float], cap: int | None) -> tuple[dict[str, float], int | None]:
    """(the connected cluster's resources now, :func:`plan_concurrency` with the autoscaler's
    maximum when Ray knows it)."""
    import ray
    from ray._private.state import state  # what Ray Train's worker group checks against, too

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # no autoscaler config in the GCS (a local or hand-started cluster)
        most = None
    return now, plan_concurrency(now, need, cap, {k: float(v) for k, v in most.items()} if most else None)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's ``param_space``: ``{"sampled": {key: tune domain}}``."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {"sampled": {k: make[next(iter(d))](next(iter(d.values()))) for k, d in sweep.search_space.items()}}


def grid_size(sweep: SweepConfig) -> int:
    """Number of trials the sweep launches (grid product x num_samples)."""
    n = 1
    for d in sweep.search_space.values():
        if "grid" in d:
            n *= len(d["grid"])
    return n * sweep.num_samples


def iou_text(metrics: dict[str, Any], prefix: str = "val_iou/") -> str:
    """Per-class IoU table (text) from a report's ``val_iou/<class>`` entries."""
    rows = [(k[len(prefix):], float(v)) for k, v in metrics.items() if k.startswith(prefix)]
    w = max([len(n) for n, _ in rows] + [5])
    lines = [f"{'class':<{w}}  IoU"] + [f"{n:<{w}}  {100 * v:5.1f}" for n, v in rows]
    if "val_miou" in metrics:
        lines.append(f"{'mIoU':<{w}}  {100 * float(metrics['val_miou']):5.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the trial (runs in a Tune trial actor)
# ----------------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune driver function of one trial: a full Ray Train run with this trial's values.

    Args:
        config: Tune's trial config, ``{"sampled": {key: value}}``.
        sweep: constants from :func:`run_sweep` (base config dict, derived rules, storage,
            tracking URI, experiment and parent run id).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysemiseg.train.driver import build_trainer
    from raysemiseg.tune.tracking import Tracker

    ctx = ray.tune.get_context()
    trial, trial_id = ctx.get_trial_name(), ctx.get_trial_id()
    values = resolve_values(config["sampled"], sweep["derived"])
    cfg = trial_config(sweep["base"], config["sampled"], sweep["derived"], run_name=f"{sweep['name']}-{trial}",
                       storage_path=sweep["trials_path"], tracking_uri=sweep["tracking_uri"],
                       experiment=sweep["experiment"])
    callbacks: list[Any] = [TuneReportCallback()]
    tracker = None
    if cfg.tracking.enabled:
        tracker = Tracker.for_run(cfg, parent_run_id=sweep["parent_run_id"])
        tracker.start()
        tracker.set_tags({"raysemiseg.sweep": sweep["name"], "raysemiseg.trial": trial,
                          "raysemiseg.trial_id": trial_id})
        free = {f"sweep.{k}": v for k, v in values.items() if "." not in k}
        if free:
            tracker.log_params(free)
        callbacks.append(tracker.callback())
    trainer, _ = build_trainer(cfg, callbacks=callbacks)
    try:
        result = trainer.fit()
    except BaseException as e:
        # also reached when the scheduler stops the trial; the sweep driver reconciles the status
        # with Tune's own record (see reconcile_children)
        if tracker is not None:
            tracker.set_tags({"raysemiseg.trial_exception": type(e).__name__})
            tracker.end("FAILED")
        raise
    if tracker is not None:
        finish_child(tracker, dict(result.metrics or {}))


def finish_child(tracker: Any, final: dict[str, Any], status: str = "FINISHED") -> None:
    """Log a trial's final per-class IoU (metrics ``final/...`` and ``final_iou.txt``) and close it."""
    if final:
        tracker.log_metrics({f"final/{k}": v for k, v in final.items()
                             if k == "val_miou" or k.startswith("val_iou/")}, step=int(final.get("epoch", 0)))
        tracker.log_text(iou_text(final), "final_iou.txt")
    tracker.end(status)


# ----------------------------------------------------------------------------------------------
# the sweep (driver)
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What :func:`run_sweep` leaves behind.

    Attributes:
        sweep_dir: ``<storage>/<name>``: Tune's experiment, the trials' Train runs, ``best.yaml``
            (a local path, or a URI for a URI storage).
        best_config_path: the best trial's TrainConfig YAML.
        best_metric: its best ``metric`` value.
        table: the printed results table.
        rows: one dict per trial (trial, values, epochs, last/best metric, status).
        parent_run_id / tracking_uri: the MLflow parent run.
        concurrency: ``max_concurrent_trials`` given to Tune (None: unset, Tune queues the trials
            until the cluster grows).
    """

    sweep_dir: str | Path
    best_config_path: str | Path | None
    best_metric: float | None
    table: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    concurrency: int | None = 1


def run_sweep(path: str | Path, *, ray_address: str | None = None, print_table: bool = True,
              overrides: dict[str, Any] | None = None) -> SweepResult:
    """Run the sweep file at ``path`` (see the module docstring) and return its results.

    ``overrides``: dotted keys of the sweep file (as ``raysemiseg tune --set``). A ``kind:
    pseudolabel`` sweep runs :func:`raysemiseg.tune.label_sweep.run_label_sweep`.

    Raises:
        FileNotFoundError / ConfigError / ValueError: invalid sweep, base config or budget,
            before any trial starts.
        RuntimeError: every trial failed (the first error is included).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raysemiseg.runtime import ensure_ray
    from raysemiseg.tune.tracking import Tracker, resolve_tracking_uri

    sweep, base = load_sweep(path, overrides)
    if sweep.kind == "pseudolabel":
        from raysemiseg.tune.label_sweep import run_label_sweep

        return run_label_sweep(path, sweep, base, ray_address=ray_address, print_table=print_table)
    root_str = sweep.storage_path or storage.join(base["run"]["storage_path"], "sweeps")
    if not storage.is_uri(root_str):
        root_str = str(Path(root_str).resolve())
    sweep_dir = storage.join(root_str, sweep.name)

    need = trial_cpu_need(base, sweep.resources, sweep.name)
    ensure_ray(ray_address, num_cpus=local_cpus(sweep.resources, need), need=need)
    require_state_api()
    nodes = storage.alive_nodes()
    storage.check_shared_paths({"storage_path": root_str, **{f"base.{s}.{k}": base[s].get(k) for s, k in (
        ("data", "store"), ("data", "split_file"), ("data", "label_store"), ("run", "storage_path"))}},
        nodes, what=f"sweep {sweep.name!r}")
    need = trial_resources(base, sweep.resources)
    now, concurrency = cluster_plan(need, sweep.resources.max_concurrent_trials)
    cpus = now.get("CPU", 0.0)

    uri, art = resolve_tracking_uri(base["tracking"]["tracking_uri"], root_str)
    if base["tracking"]["enabled"]:
        storage.check_tracking_store(uri, nodes, what=f"sweep {sweep.name!r}")
    experiment = base["tracking"]["experiment"]
    parent = None
    if base["tracking"]["enabled"]:
        parent = Tracker(uri, experiment, run_name=sweep.name, run_key=sweep_run_key(sweep_dir), artifact_location=art)
        parent.start()
        parent.set_tags({"raysemiseg.sweep": sweep.name, "raysemiseg.kind": "sweep"})
        parent.log_params({"sweep": sweep.model_dump(mode="json"), "cluster_cpus": cpus, "trial_resources": need,
                           "max_concurrent_trials": concurrency})
        parent.log_text(Path(path).read_text(), "sweep.yaml")

    max_t = sweep.scheduler.max_t or int(base["optim"]["epochs"])
    if sweep.scheduler.name == "asha":
        scheduler = ASHAScheduler(metric=sweep.metric, mode=sweep.mode, max_t=max_t,
                                  grace_period=min(sweep.scheduler.grace_period, max_t),
                                  reduction_factor=sweep.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    payload = {"name": sweep.name, "base": base, "derived": sweep.derived,
               "trials_path": storage.join(sweep_dir, "trials"), "tracking_uri": uri if parent else None,
               "experiment": experiment, "parent_run_id": parent.run_id if parent else None}
    res = sweep.resources
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=payload),
                                    {"CPU": res.driver_cpus, "memory": res.driver_memory_mb * 2**20})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=sweep.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir),
    )
    try:
        grid = tuner.fit()
        rows = result_rows(grid, sweep, max_t)
        table = format_table(rows, sweep)
        best = best_row(rows, sweep)
        best_cfg = trial_config(base, best["sampled"], sweep.derived, run_name=f"{sweep.name}-best",
                                storage_path=base["run"]["storage_path"])
        best_path = storage.join(sweep_dir, "best.yaml")
        storage.write_text(best_path, dump_config(best_cfg))
        if parent is not None:
            reconcile_children(parent, rows)
            finish_parent(parent, sweep, best, rows, table, best_path)
    except BaseException:
        if parent is not None:
            parent.end("FAILED")
        raise
    if print_table:
        print_result(sweep, best, table, best_path, parent, uri)
    return SweepResult(sweep_dir, best_path, float(best["best"]), table, rows,
                       parent.run_id if parent else None, uri if parent else None, concurrency)


def sweep_run_key(sweep_dir: str | Path) -> str:
    """The parent MLflow run's key: the sweep folder plus this invocation's start time and a random
    suffix. Every ``raysemiseg tune`` call is a new Tune experiment (new trials), so it gets a new
    parent run; keying by the folder alone reopened the previous sweep's run and MLflow refused the
    changed params (``--set overrides.optim.epochs=2`` after a run with 3)."""
    import uuid

    return f"{sweep_dir}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def best_row(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any]:
    """The best trial's row by ``sweep.metric`` / ``sweep.mode``.

    Raises:
        RuntimeError: every trial failed (the first error is included).
    """
    ok = [r for r in rows if r["best"] is not None]
    if not ok:
        errors = [r["error"] for r in rows if r["error"]]
        raise RuntimeError(f"sweep {sweep.name!r}: every trial failed; first error: {errors[:1]}")
    return max(ok, key=lambda r: r["best"]) if sweep.mode == "max" else min(ok, key=lambda r: r["best"])


def finish_parent(parent: Any, sweep: SweepConfig, best: dict[str, Any], rows: list[dict[str, Any]], table: str,
                  best_path: str | Path) -> None:
    """Log the sweep's outcome on its parent MLflow run (best metric, trial, table, best config) and close it."""
    parent.log_metrics({f"best_{sweep.metric}": best["best"], "trials": len(rows)})
    parent.log_params({"best_trial": best["trial"]})
    parent.log_text(table, "results.txt")
    parent.log_text(storage.read_text(best_path), "best.yaml")
    parent.end("FINISHED")


def print_result(sweep: SweepConfig, best: dict[str, Any], table: str, best_path: str | Path, parent: Any, uri: str) -> None:
    """The results table, the best trial and where the MLflow runs are."""
    print(table)
    print(f"\nbest: {best['trial']} {sweep.metric}={best['best']:.4f} -> {best_path}")
    if parent is not None:
        print(f"MLflow: parent run {parent.run_id} in {uri}\n  open with: {parent.ui_command()}")


def result_rows(grid: Any, sweep: SweepConfig, max_t: int) -> list[dict[str, Any]]:
    """One dict per trial from Tune's ``ResultGrid``: trial, sampled values, epochs, last and best
    ``metric``, status (finished / early-stopped / error) and error text."""
    rows = []
    for res in grid:
        sampled = dict((res.config or {}).get("sampled", {}))
        df = res.metrics_dataframe
        hist = [] if df is None or sweep.metric not in getattr(df, "columns", []) else df[sweep.metric].dropna().tolist()
        epochs = len(hist)
        best = (max(hist) if sweep.mode == "max" else min(hist)) if hist else None
        status = "error" if res.error else ("finished" if epochs >= max_t else "early-stopped")
        # Tune's own per-epoch record of the IoU metrics: the source for child runs whose MLflow
        # callback was cut off when the scheduler stopped the trial (see reconcile_children)
        history: list[dict[str, float]] = []
        if df is not None and sweep.metric in getattr(df, "columns", []):
            cols = [c for c in df.columns if c == "val_miou" or str(c).startswith("val_iou/")]
            for _, rec in df[cols].iterrows():
                history.append({c: float(v) for c, v in rec.items() if isinstance(v, (int, float)) and v == v})
        trial = str((res.metrics or {}).get("trial_id") or (Path(res.path).name if res.path else "?"))
        rows.append({"trial": trial, "sampled": sampled, "values": resolve_values(sampled, sweep.derived),
                     "epochs": epochs, "last": hist[-1] if hist else None, "best": best, "status": status,
                     "error": str(res.error)[:300] if res.error else None, "history": history})
    rows.sort(key=lambda r: (r["best"] is None, -(r["best"] or 0.0) if sweep.mode == "max" else (r["best"] or 0.0)))
    return rows


def format_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    """The results table printed at the end of a sweep (best first)."""
    keys = sorted({k for r in rows for k in r["values"]})
    short = {k: k.split(".")[-1] for k in keys}
    head = ["trial"] + [short[k] for k in keys] + ["epochs", f"last {sweep.metric}", f"best {sweep.metric}", "status"]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[r["trial"][:40]] + [fmt(r["values"].get(k)) for k in keys]
            + [str(r["epochs"]), fmt(r["last"]), fmt(r["best"]), r["status"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([f"sweep {sweep.name}: {len(rows)} trials", line(head), line(["-" * w for w in widths])]
                     + [line(b) for b in body])


def reconcile_children(parent: Any, rows: list[dict[str, Any]]) -> None:
    """Make each child run's status agree with Tune's record of its trial.

    A trial the scheduler stopped (ASHA, or at ``max_t``) has its process ended by Tune, so its
    child run is left RUNNING or marked FAILED by the interrupted trial function. Here: a trial
    without an error in Tune's results is FINISHED when it ran all epochs, else KILLED with tag
    ``raysemiseg.early_stopped``; its last per-class IoU is logged as ``final/...`` and
    ``final_iou.txt`` when the trial function could not do it.
    """
    by_id = {r["trial"]: r for r in rows}
    c = parent.client
    exp = c.get_experiment_by_name(parent.experiment)
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    for run in children:
        row = by_id.get(run.data.tags.get("raysemiseg.trial_id", ""))
        if row is None or row["status"] == "error" or run.info.status == "FINISHED":
            continue
        from raysemiseg.tune.tracking import log_metrics

        if "val_miou" not in run.data.metrics and row.get("history"):
            # the trial was stopped before its MLflow callback logged: replay Tune's record
            for epoch, rec in enumerate(row["history"], start=1):
                log_metrics(c, run.info.run_id, rec, step=epoch)
            run = c.get_run(run.info.run_id)
        if not any(k.startswith("final/") for k in run.data.metrics):
            final = {k: v for k, v in run.data.metrics.items() if k == "val_miou" or k.startswith("val_iou/")}
            if final:
                log_metrics(c, run.info.run_id, {f"final/{k}": v for k, v in final.items()}, step=row["epochs"])
                c.log_text(run.info.run_id, iou_text(final), "final_iou.txt")
        early = row["status"] == "early-stopped"
        c.set_tag(run.info.run_id, "raysemiseg.early_stopped", str(early).lower())
        c.set_terminated(run.info.run_id, status="KILLED" if early else "FINISHED")


__all__ = ["SweepConfig", "SweepResult", "format_table", "grid_size", "load_sweep", "param_space",
           "plan_concurrency", "reconcile_children", "resolve_values", "run_sweep", "run_trial", "trial_config"]
