"""Ray Tune sweeps over pseudo-label recipe parameters (``kind: pseudolabel`` sweep files).

The diffusion parameters of Xiao et al. 2018 (SLIC segments, sigma of Eq. 2, seed and background
thresholds), the CAM background score, the dense-CRF kernels or the E-step biases are tuned on the
quality of the labels they give, not on a downstream training run: each trial runs the recipe with
its values on the images of ``labels.split`` that have a ground-truth pixel mask (in the trial's
process, :func:`raysemiseg.pseudolabel.pipeline.run_serial`, the same stage code as the Ray Data
pipeline) and scores them with the shared metric
(:func:`raysemiseg.pseudolabel.report.score_labels`). It reports once: ``label_miou``,
``label_pixel_acc``, ``label_iou/<class>``, ``images``, ``quarantined`` (images whose recipe
failed; rows in = labelled + quarantined) and ``seconds_per_image``.

A sweep file::

    name: diffusion
    kind: pseudolabel
    base: ../pseudolabel/cam_diffusion.yaml      # the recipe, relative to this file
    labels: {store: runs/sample-voc21, split: val, max_rows: 48, checkpoint: CAM_CHECKPOINT_DIR}
    search_space:                                 # <stage name>.<param>, or free variables (no dot)
      diffusion.sigma: {grid: [1.0, 3.0, 9.0]}
      diffusion.seed_threshold: {grid: [0.5, 0.7]}
    resources: {max_concurrent_trials: null}      # trials at once: floor(cluster CPUs / labels.cpus_per_trial),
                                                  # the autoscaler's maximum CPUs when the cluster has one

MLflow: one parent run per sweep and one child run per trial (the trial's stage parameters as
params, the scores as metrics, ``label_iou.txt``), through :mod:`raysemiseg.tune.tracking`. The best
trial's recipe is written to ``<sweep dir>/best.yaml``, which ``raysemiseg pseudolabel`` runs.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from raysemiseg.config import ConfigError

_ROW_COLUMNS = ["image_id", "source", "image", "labels", "boxes", "height", "width"]


def load_label_base(recipe_path: Path, sweep: Any) -> dict[str, Any]:
    """The base recipe of a pseudo-label sweep as a dict, with the sweep's ``overrides`` (top-level
    recipe keys) applied and the ``labels`` section's local paths made absolute (trials run in
    Tune's folders).

    Checkpoints may be checkpoint directories or Ray Train run folders (their newest checkpoint),
    local or URIs (:func:`raysemiseg.train.checkpoint.find_checkpoint`).

    Raises:
        FileNotFoundError: the recipe, the image store or a checkpoint does not exist.
        ConfigError: the recipe is invalid.
    """
    from raysemiseg.pseudolabel.pipeline import load_recipe

    if not recipe_path.is_file():
        raise FileNotFoundError(f"sweep {sweep.name!r}: recipe {recipe_path} does not exist")
    raw = yaml.safe_load(recipe_path.read_text()) or {}
    raw.update(sweep.overrides)
    try:
        load_recipe(copy.deepcopy(raw))
    except ValueError as e:
        raise ConfigError(f"sweep {sweep.name!r}: base recipe {recipe_path}: {e}") from None
    lab = sweep.labels
    store = _abs(lab.store)
    if not (Path(store) / "store.json").is_file():
        raise FileNotFoundError(f"sweep {sweep.name!r}: labels.store {store} is not an image store (no store.json)")
    from raysemiseg.train.checkpoint import find_checkpoint

    # the checkpoint directory, found now (a missing one fails here); a URI stays a URI and each
    # trial copies it on its own node (load_method -> local_checkpoint)
    return {"recipe": raw, "store": store, "split": lab.split, "max_rows": lab.max_rows,
            "checkpoint": find_checkpoint(_abs(lab.checkpoint)) if lab.checkpoint else None,
            "stage_checkpoints": {k: find_checkpoint(_abs(v)) for k, v in lab.stage_checkpoints.items()},
            "cpus_per_trial": lab.cpus_per_trial, "experiment": lab.experiment, "tracking_uri": lab.tracking_uri}


def _abs(p: str) -> str:
    return p if "://" in p or Path(p).is_absolute() else str(Path(p).resolve())


def label_trial_recipe(base: dict[str, Any], values: dict[str, Any],
                       derived: dict[str, dict[str, list[str]]] | None = None) -> Any:
    """The recipe of one trial: ``base["recipe"]`` with each dotted value ``STAGE.PARAM`` set in the
    params of every stage named STAGE (free variables, without a dot, are not applied).

    Returns:
        :class:`raysemiseg.pseudolabel.pipeline.Recipe`.

    Raises:
        ValueError: the recipe has no stage of that name, or a value is invalid for the stage
            (names the key and the stage).
    """
    from raysemiseg.pseudolabel.pipeline import load_recipe
    from raysemiseg.tune.sweep import resolve_values

    raw = copy.deepcopy(base["recipe"])
    stages = raw.get("stages") or []
    for key, v in resolve_values(values, derived or {}).items():
        if "." not in key:
            continue
        stage, param = key.split(".", 1)
        hits = [s for s in stages if s.get("name") == stage]
        if not hits:
            raise ValueError(f"search space key {key!r}: the recipe has no stage {stage!r}; "
                             f"stages: {[s.get('name') for s in stages]}")
        for s in hits:
            s.setdefault("params", {})[param] = v
    return load_recipe(raw)


def labelled_rows(store_path: str, split: str, max_rows: int | None) -> tuple[list[dict[str, Any]], dict[str, bytes], Any]:
    """The rows a trial labels: the first ``max_rows`` images of ``split`` with a pixel mask.

    Returns:
        (rows as dicts for :func:`run_serial`, ``{image_id: encoded mask}``, the label space).

    Raises:
        ValueError: the split has no image with a pixel mask.
    """
    from raysemiseg.data.store import open_store

    st = open_store(store_path)
    t = st.read_table(_ROW_COLUMNS + ["mask"], filter_split=split)
    rows = [r for r in t.to_pylist() if r["mask"] is not None]
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise ValueError(f"store {store_path}: split {split!r} has no image with a ground-truth mask to score "
                         "pseudo labels against")
    gt = {r["image_id"]: r.pop("mask") for r in rows}
    return rows, gt, st.label_space


def score_trial(base: dict[str, Any], values: dict[str, Any], derived: dict[str, dict[str, list[str]]] | None = None
                ) -> tuple[dict[str, float], Any, str]:
    """Run one trial's recipe and score it (no Ray needed; the trial function calls this).

    Returns:
        (report metrics, the recipe, the per-class IoU table text).

    Raises:
        ValueError: every image was quarantined (the reasons of the first ones are given).
    """
    from raysemiseg.eval.metrics import format_iou_table
    from raysemiseg.pseudolabel.pipeline import run_serial
    from raysemiseg.pseudolabel.report import score_labels

    recipe = label_trial_recipe(base, values, derived)
    rows, gt, space = labelled_rows(base["store"], base["split"], base["max_rows"])
    t0 = time.perf_counter()
    out = run_serial(recipe, rows, space.background_id, space.num_classes, checkpoint=base["checkpoint"],
                     stage_checkpoints=base["stage_checkpoints"] or None)
    dt = time.perf_counter() - t0
    masks = {r["image_id"]: r["mask"] for r in out if r["mask"] is not None}
    bad = [f"{r['image_id']} ({r['q_stage']}: {r['q_reason']})" for r in out if r["mask"] is None]
    if not masks:
        raise ValueError(f"recipe {recipe.name!r}: every one of {len(out)} images was quarantined: {bad[:3]}")
    metrics, _ = score_labels(masks, gt, space.num_classes, space.ignore_index, where=f"recipe {recipe.name!r}")
    report: dict[str, float] = {"label_miou": float(metrics.miou), "label_pixel_acc": float(metrics.pixel_acc),
                                "images": float(len(rows)), "quarantined": float(len(bad)),
                                "seconds_per_image": dt / len(rows)}
    for c, v in enumerate(metrics.iou):
        if math.isfinite(float(v)):
            report[f"label_iou/{space.names[c]}"] = float(v)
    table = format_iou_table(metrics, space, title=f"{recipe.name}: {len(masks)} images ({len(bad)} quarantined)")
    return report, recipe, table


def run_label_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function of one pseudo-label trial (see the module docstring)."""
    import ray.tune
    import torch

    from raysemiseg.tune.tracking import Tracker, flatten

    torch.set_num_threads(max(1, int(sweep["base"]["cpus_per_trial"])))
    ctx = ray.tune.get_context()
    trial, trial_id = ctx.get_trial_name(), ctx.get_trial_id()
    tracker = None
    if sweep["tracking_uri"]:
        tracker = Tracker(sweep["tracking_uri"], sweep["experiment"], run_name=f"{sweep['name']}-{trial}",
                          run_key=f"{sweep['sweep_dir']}/{trial_id}", parent_run_id=sweep["parent_run_id"])
        tracker.start()
        tracker.set_tags({"raysemiseg.sweep": sweep["name"], "raysemiseg.trial": trial, "raysemiseg.trial_id": trial_id,
                          "raysemiseg.kind": "pseudolabel-trial"})
    try:
        report, recipe, table = score_trial(sweep["base"], config["sampled"], sweep["derived"])
    except BaseException as e:
        if tracker is not None:
            tracker.set_tags({"raysemiseg.trial_exception": f"{type(e).__name__}: {e}"[:500]})
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.log_params({**flatten({s.name: s.build_params().model_dump(mode="json") for s in recipe.stages}, "stage."),
                            **{f"sweep.{k}": v for k, v in config["sampled"].items()}})
        tracker.log_metrics(report, step=1)
        tracker.log_text(table, "label_iou.txt")
        tracker.end("FINISHED")
    ray.tune.report(report)


def run_label_sweep(path: str | Path, sweep: Any, base: dict[str, Any], *, ray_address: str | None = None,
                    print_table: bool = True) -> Any:
    """Run a ``kind: pseudolabel`` sweep (see the module docstring); called by
    :func:`raysemiseg.tune.sweep.run_sweep`.

    Returns:
        :class:`raysemiseg.tune.sweep.SweepResult` (``best_config_path``: the best recipe YAML).

    Raises:
        ValueError: one trial's CPUs can never fit the cluster, ``max_concurrent_trials`` exceeds
            what fits, or a path / MLflow store other nodes cannot reach (multi-host cluster).
        RuntimeError: every trial failed (the first error is included).
    """
    from ray import tune

    from raysemiseg import storage
    from raysemiseg.runtime import CpuNeed, ensure_ray
    from raysemiseg.tune.sweep import (
        SweepResult,
        best_row,
        cluster_plan,
        finish_parent,
        format_table,
        local_cpus,
        param_space,
        print_result,
        result_rows,
        sweep_run_key,
    )
    from raysemiseg.tune.tracking import Tracker, resolve_tracking_uri

    root_str = sweep.storage_path or "runs/sweeps"
    if not storage.is_uri(root_str):
        root_str = str(Path(root_str).resolve())
    sweep_dir = storage.join(root_str, sweep.name)
    per_trial = CpuNeed(held=0.0, data=base["cpus_per_trial"], per_node=base["cpus_per_trial"],
                        what=f"one trial of sweep {sweep.name!r}", knobs="labels.cpus_per_trial, resources.local_num_cpus")
    ensure_ray(ray_address, num_cpus=local_cpus(sweep.resources, per_trial), need=per_trial)
    nodes = storage.alive_nodes()
    storage.check_shared_paths({"storage_path": root_str, "labels.store": base["store"],
                                "labels.checkpoint": base["checkpoint"],
                                **{f"labels.stage_checkpoints.{k}": v for k, v in base["stage_checkpoints"].items()}},
                               nodes, what=f"sweep {sweep.name!r}")
    need = base["cpus_per_trial"]
    now, concurrency = cluster_plan({"CPU": need}, sweep.resources.max_concurrent_trials)
    cpus = now.get("CPU", 0.0)

    uri, art = resolve_tracking_uri(base["tracking_uri"], root_str)
    storage.check_tracking_store(uri, nodes, what=f"sweep {sweep.name!r}")
    parent = Tracker(uri, base["experiment"], run_name=sweep.name, run_key=sweep_run_key(sweep_dir), artifact_location=art)
    parent.start()
    parent.set_tags({"raysemiseg.sweep": sweep.name, "raysemiseg.kind": "pseudolabel-sweep"})
    parent.log_params({"sweep": sweep.model_dump(mode="json"), "cluster_cpus": cpus,
                       "max_concurrent_trials": concurrency})
    parent.log_text(Path(path).read_text(), "sweep.yaml")
    payload = {"name": sweep.name, "base": base, "derived": sweep.derived, "sweep_dir": str(sweep_dir),
               "tracking_uri": uri, "experiment": base["experiment"], "parent_run_id": parent.run_id}
    trainable = tune.with_resources(tune.with_parameters(run_label_trial, sweep=payload), {"CPU": need})
    tuner = tune.Tuner(trainable, param_space=param_space(sweep),
                       tune_config=tune.TuneConfig(num_samples=sweep.num_samples, max_concurrent_trials=concurrency),
                       run_config=tune.RunConfig(name="tune", storage_path=sweep_dir))
    try:
        rows = result_rows(tuner.fit(), sweep, max_t=1)
        table = format_table(rows, sweep)
        best = best_row(rows, sweep)
        best_recipe = label_trial_recipe(base, best["sampled"], sweep.derived)
        best_path = storage.join(sweep_dir, "best.yaml")
        storage.write_text(best_path, f"# best trial {best['trial']} of sweep {sweep.name} ({sweep.metric} {best['best']:.4f})\n"
                             + yaml.safe_dump(json.loads(best_recipe.model_dump_json(exclude_defaults=True)),
                                              sort_keys=False))
        finish_parent(parent, sweep, best, rows, table, best_path)
    except BaseException:
        parent.end("FAILED")
        raise
    if print_table:
        print_result(sweep, best, table, best_path, parent, uri)
    return SweepResult(sweep_dir, best_path, float(best["best"]), table, rows, parent.run_id, uri, concurrency)


__all__ = ["label_trial_recipe", "labelled_rows", "load_label_base", "run_label_sweep", "run_label_trial",
           "score_trial"]
