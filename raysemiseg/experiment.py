"""Experiments: several methods trained on one split at one step budget, scored side by side.

``raysemiseg experiment configs/experiments/semi_i3s.yaml`` runs, in order:

1. the image store (built from the bundled real sample when ``store.build_from_sample`` and the
   folder holds none);
2. the split file (I3S fraction / list / per class, or C3S split-set 1-4; :mod:`raysemiseg.data.splits`);
3. shared pseudo-label stores (:func:`raysemiseg.pseudolabel.pipeline.run_pipeline`), e.g. Bbox-Rect
   on the weak rows;
4. each *arm*: a chain of steps, each a training run through the one Ray Train loop
   (:func:`raysemiseg.train.driver.train`) or a pseudo-label run that uses an earlier step's
   checkpoint (L-Net map M -> CAM + self-diffusion, Xiao et al. 2018). A later training step starts
   from the previous one with ``method.params.init_from: "{prev}"``;
5. the last checkpoint of every arm evaluated on the eval split with the one metric; a side-by-side
   table (mIoU; for C3S also the strong-class and weak-class mIoU, the papers' grey/white columns),
   per-class IoU, a bar chart and ``results.json`` / ``results.md`` in the workdir, and a parent
   MLflow run holding the comparison (each training step is its own tracked run).

Every step is resumable: a training step whose ``step.json`` exists is skipped; a killed one resumes
from its last Ray Train checkpoint (same run name); pseudo-label stores skip committed shards.

Placeholders in string values of ``set``: ``{workdir}``, ``{store}``, ``{split_file}``,
``{labels.NAME}`` (a pseudo-label store, shared or made by an earlier arm step), ``{prev}`` (the
checkpoint of the arm's previous training step: its best by val mIoU, exact ties to the later one, or
its latest for an auxiliary stage such as ``lnet``, ``pretrain_pnet``, ``attention``, ``classify``:
:func:`raysemiseg.train.driver.checkpoint_rule`), ``{step.NAME}`` (the checkpoint of the arm's step
NAME) and ``{arms.ARM.NAME}`` (step NAME of an earlier arm, e.g. to reuse its L-Net).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from raysemiseg.config import StrictModel, TrainConfig, dotted, load_config

_PLACEHOLDER = re.compile(r"\{([a-z_]+(?:\.[A-Za-z0-9_\-]+)*)\}")


def _say(msg: str) -> None:
    print(f"[experiment] {msg}", flush=True)


class StoreDef(StrictModel):
    """The image store of the experiment."""

    path: str = Field(..., description="image store folder")
    build_from_sample: bool = Field(True, description="build it from the bundled real sample when missing")
    sample: Literal["voc", "coco", "coco+voc"] = Field(
        "coco", description="which bundled sample: 'voc' (476 PASCAL VOC 2012 images, VOC reader, boxes "
                            "derived from the masks), 'coco' (318 MS-COCO images) or 'coco+voc' (both, one store)")
    rebuild: bool = False


class SplitDef(StrictModel):
    """The split file (see ``raysemiseg data split``); None in the experiment = the store's own split."""

    kind: Literal["i3s-fraction", "i3s-list", "i3s-per-class", "c3s"]
    fraction: float | None = None
    strong_list: str | None = None
    per_class: int | None = None
    split_set: int | None = None
    mixed: Literal["weak", "none"] = "weak"
    seed: int = 0


class LabelsDef(StrictModel):
    """A pseudo-label store made by a recipe (``configs/pseudolabel/*.yaml``)."""

    name: str = Field(..., description="referred to as {labels.NAME}")
    recipe: str
    set: dict[str, Any] = Field(default_factory=dict, description="recipe overrides, e.g. {splits: [train]}")
    checkpoint: str | None = Field(None, description="checkpoint of the recipe's model stages ('{prev}' in an arm)")
    stage_checkpoints: dict[str, str] = Field(default_factory=dict,
                                              description="{stage: checkpoint}, e.g. {lnet_map: '{prev}'}")


class StepDef(StrictModel):
    """One step of an arm: a training run (``train``) or a pseudo-label run (``labels``)."""

    name: str
    train: dict[str, Any] | None = Field(None, description="dotted-key overrides of the base train config")
    config: str | None = Field(None, description="train config file (default: the experiment's base)")
    labels: LabelsDef | None = None

    @model_validator(mode="after")
    def _one(self) -> "StepDef":
        if (self.train is None) == (self.labels is None):
            raise ValueError(f"step {self.name!r}: give exactly one of 'train' (overrides) or 'labels' (a recipe)")
        return self


class ArmDef(StrictModel):
    """One method of the comparison; its last training step is evaluated."""

    name: str
    steps: list[StepDef]
    split: SplitDef | None = Field(None, description="this arm's own split (e.g. DecoupledNet's 5/10/25 strong "
                                                     "images per class); None = the experiment's split")
    also_given_labels: bool = Field(
        False, description="also score the last checkpoint predicting with each image's given labels "
                           "(TransferNet-GT, Hong et al. 2016 Sec. 4.3), as column '<arm>-GT' "
                           "(label-conditioned methods: transfernet, decoupled)")

    @model_validator(mode="after")
    def _has_train(self) -> "ArmDef":
        if not any(s.train is not None for s in self.steps):
            raise ValueError(f"arm {self.name!r} has no training step")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"arm {self.name!r}: step names repeat: {names}")
        return self


class ExperimentConfig(StrictModel):
    """``configs/experiments/*.yaml`` (and the quickstart's ``experiment:`` section)."""

    name: str
    workdir: str = Field(..., description="split, label stores, runs, eval and results go here")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (None = cores, min 2, raised "
                                                         "to the largest step's workers + 1 CPU for Ray Data)")
    label_space: str = "voc21"
    store: StoreDef
    split: SplitDef | None = None
    base: dict[str, Any] | str = Field(..., description="base train config: a YAML path or an inline mapping")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every training step "
                                                                  "(the shared step budget, seed, ...)")
    labels: list[LabelsDef] = Field(default_factory=list, description="shared pseudo-label stores")
    arms: list[ArmDef]
    eval_split: str = "val"
    eval_crf: bool = False
    eval_flip: bool = Field(False, description="left-right flip test-time augmentation in the final evaluations")
    eval_max_rows: int | None = None
    num_overlays: int = 6
    compare_untrained: bool = Field(False, description="also score the first arm's network with an untrained head")
    experiment_tracking: bool = Field(True, description="a parent MLflow run with the comparison")

    @model_validator(mode="after")
    def _names(self) -> "ExperimentConfig":
        arms = [a.name for a in self.arms]
        if not arms or len(set(arms)) != len(arms):
            raise ValueError(f"arms must be non-empty with distinct names, got {arms}")
        return self


@dataclass
class ArmResult:
    """Where an arm's training ended and how it scored."""

    name: str
    checkpoint: str  # a local path, or a URI for a URI run.storage_path
    eval: Any  # raysemiseg.eval.predict.EvalResult
    train_s: float
    steps: dict[str, str] = field(default_factory=dict)


@dataclass
class ExperimentResult:
    """The comparison: arms in config order, the table text and the files written."""

    arms: list[ArmResult]
    table: str
    groups: dict[str, list[int]]
    files: list[Path]
    timings: dict[str, float]
    untrained: Any = None


# ------------------------------------------------------------------------------------------
def ensure_store(path: str | Path, label_space: str, rebuild: bool = False,
                 sample: Literal["voc", "coco", "coco+voc"] = "coco") -> Path:
    """Build the image store from a bundled real sample at ``path`` unless that store is there.

    Args:
        path: the store folder.
        label_space: the target label space (built-in name or YAML path).
        rebuild: rebuild even when the store exists.
        sample: ``"voc"``: ``raysemiseg/sample_data/voc2012-sample`` through the VOC reader (476 rows,
            splits train 326 / val 150, boxes derived from the masks); ``"coco"``: the COCO sample
            (coco-mini + coco-tiny, 318 rows); ``"coco+voc"``: both in one store (794 rows; COCO's
            60 non-VOC classes as TransferNet's source, VOC as its target: use label space coco80).
            A store at ``path`` built from other sources is rebuilt.

    Raises:
        FileNotFoundError: the bundled sample is missing from the installed package.
    """
    import json

    from raysemiseg.data.sample import sample_sources, voc_sample_dir
    from raysemiseg.data.store import Source, build_store

    p = Path(path)
    sources = []
    if sample in ("coco", "coco+voc"):
        sources += [Source("coco", (str(a), str(i))) for a, i in sample_sources()]
    if sample in ("voc", "coco+voc"):
        sources.append(Source("voc", (str(voc_sample_dir()),)))
    if (p / "store.json").is_file() and not rebuild:
        built_from = [(s["kind"], list(s["paths"])) for s in json.loads((p / "store.json").read_text())["sources"]]
        if built_from == [(s.kind, list(s.paths)) for s in sources]:
            _say(f"store: reusing {p}")
            return p
        _say(f"store: {p} was built from {built_from}, not the {sample} sample: rebuilding")
    res = build_store(sources, label_space, p)
    _say(f"store: built {p} from the {sample} sample ({res})")
    return p


def ensure_split(store: Path, spec: SplitDef, out: Path) -> Path:
    """Write the split file ``out`` (kept when it exists with the same spec); prints the role counts."""
    from dataclasses import asdict

    from raysemiseg.data.splits import SplitSpec, format_split_counts, make_split, read_split, write_split

    kind_spec = SplitSpec(spec.kind, seed=spec.seed, fraction=spec.fraction, strong_list=spec.strong_list,
                          per_class=spec.per_class, split_set=spec.split_set, mixed=spec.mixed)
    want = json.loads(json.dumps(asdict(kind_spec)))
    if out.is_file():
        table, have = read_split(out)
        if have == want:
            _say(f"split: reusing {out}")
            return out
    table = make_split(store, kind_spec)
    write_split(table, out)
    _say(f"split {spec.kind} -> {out}\n{format_split_counts(table)}")
    return out


def class_groups(split: SplitDef | None, space: Any) -> dict[str, list[int]]:
    """``{"strong classes": ids, "weak classes": ids}`` for a C3S split (background in neither), else {}.

    Raises:
        ValueError: the split-set's classes are missing from ``space`` (see ``c3s_classes``).
    """
    if split is None or split.kind != "c3s":
        return {}
    from raysemiseg.data.splits import c3s_classes

    strong, weak = c3s_classes(int(split.split_set or 0), space)
    return {"strong classes": sorted(strong), "weak classes": sorted(weak)}


def substitute(value: Any, env: dict[str, str]) -> Any:
    """Replace ``{key}`` placeholders in the strings of ``value`` (nested dicts/lists) from ``env``.

    Raises:
        KeyError: a placeholder with no value (names the placeholder and the known ones).
    """
    if isinstance(value, str):
        def rep(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise KeyError(f"placeholder {{{m.group(1)}}} has no value here; known: {sorted(env)}")
            return env[m.group(1)]
        return _PLACEHOLDER.sub(rep, value)
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    return value


def format_comparison(results: dict[str, Any], label_space: Any, groups: dict[str, list[int]] | None = None,
                      title: str | None = None) -> str:
    """Side-by-side per-class IoU table (percent) of several :class:`SegMetrics`.

    Args:
        results: ``{column name: SegMetrics}`` (same label space), in column order.
        label_space: names the classes.
        groups: optional ``{group name: class ids}``; a footer row per group gives the mIoU over it,
            and class rows are marked ``S``/``W`` for the first two groups (C3S strong / weak).

    Returns:
        The table; classes absent from every column's prediction and ground truth are left out.
    """
    import numpy as np

    names = list(results)
    ms = [results[n] for n in names]
    widths = [max(7, len(n)) + 2 for n in names]
    mark = {}
    for tag, ids in zip("SW", (groups or {}).values()):
        mark.update({int(i): tag for i in ids})
    cw = max(len("mIoU ") + max((len(g) for g in (groups or {})), default=0),
             *(len(label_space.names[c]) for c in range(label_space.num_classes)))
    head = f"{'class':<{cw}}   " + "".join(f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def row(vals: list[float]) -> str:
        return "".join(f"{'-':>{w}}" if not np.isfinite(v) else f"{100 * v:>{w}.2f}" for v, w in zip(vals, widths))

    for c in range(label_space.num_classes):
        vals = [float(m.iou[c]) for m in ms]
        if all(not np.isfinite(v) for v in vals):
            continue
        lines.append(f"{label_space.names[c]:<{cw}} {mark.get(c, ' '):>1} " + row(vals))
    lines.append("-" * len(head))
    lines.append(f"{'mIoU':<{cw}}   " + row([m.miou for m in ms]))
    for g, ids in (groups or {}).items():
        lines.append(f"{'mIoU ' + g:<{cw}}   " + row([m.miou_over(ids) for m in ms]))
    lines.append(f"{'pixel acc':<{cw}}   " + row([m.pixel_acc for m in ms]))
    return "\n".join(lines)


def resolve_path(path: str) -> str:
    """``path`` as given when it exists (absolute or relative to the working directory), else
    relative to the repository root (where ``configs/`` lives), else unchanged (the loader then
    raises FileNotFoundError naming it)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    repo = Path(__file__).resolve().parent.parent / p
    return str(repo) if repo.exists() else path


def _train_config(ecfg: ExperimentConfig, step: StepDef, arm: str, env: dict[str, str], work: Path) -> TrainConfig:
    base = step.config or ecfg.base
    over = {**dotted(substitute(ecfg.set, env)), **dotted(substitute(step.train or {}, env))}
    fixed = {"label_space": ecfg.label_space, "data.store": env["store"],
             "run.name": f"{ecfg.name}-{arm}-{step.name}", "run.storage_path": str(work / "runs")}
    if "split_file" in env:
        fixed["data.split_file"] = env["split_file"]
    raw: dict[str, Any] | str = json.loads(json.dumps(base)) if isinstance(base, dict) else resolve_path(base)
    return load_config(raw, overrides={**fixed, **over})


def _run_train(cfg: TrainConfig, step_dir: Path, parent_run_id: str | None) -> tuple[str, float]:
    """Train (resuming a killed run) unless ``step.json`` says the step finished; returns the checkpoint
    to hand on (:attr:`TrainResult.checkpoint`: the best by val mIoU, ties to the later one; the
    latest for a method's auxiliary stages, whose val mIoU scores a frozen segmenter) and the time."""
    from raysemiseg import storage
    from raysemiseg.train.driver import run_location, train
    from raysemiseg.tune.tracking import Tracker

    import hashlib

    from raysemiseg.config import dump_config

    digest = hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]
    done = step_dir / "step.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("config_digest") not in (None, digest):
            raise ValueError(f"step {cfg.run.name}: its config changed since it finished ({done}); delete {step_dir} "
                             f"and {run_location(cfg)} to retrain it, or rename the experiment")
        if storage.exists(info["checkpoint"], "dir"):  # a local path or a URI (run.storage_path: s3://...)
            _say(f"  {cfg.run.name}: done earlier ({info['checkpoint']})")
            return str(info["checkpoint"]), float(info["train_s"])
    tracker = Tracker.for_run(cfg, parent_run_id=parent_run_id) if cfg.tracking.enabled else None
    if tracker is not None:
        tracker.start()
    t = time.perf_counter()
    _say(f"  training {cfg.run.name}: {cfg.method.name} (stage {cfg.method.stage}) / {cfg.model.backbone}, "
         f"{cfg.optim.epochs} x {cfg.optim.steps_per_epoch or 'one pass'} steps, batch {cfg.data.batch_size}")
    try:
        res = train(cfg, tracker=tracker)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end("FINISHED")
    if res.checkpoint is None:
        raise RuntimeError(f"training run {res.run_dir} produced no checkpoint")
    dt = time.perf_counter() - t
    step_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"checkpoint": str(res.checkpoint), "checkpoint_rule": res.checkpoint_rule,
                                "train_s": dt, "run_dir": str(res.run_dir),
                                "config_digest": digest,
                                "metrics": {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}}))
    _say(f"  {cfg.run.name}: {dt:.0f} s, {res.checkpoint_rule} checkpoint {res.checkpoint}")
    return res.checkpoint, dt


def _run_labels(ld: LabelsDef, env: dict[str, str], out: Path, num_cpus: int | None) -> Path:
    from raysemiseg.pseudolabel.pipeline import load_recipe, run_pipeline

    recipe = load_recipe(resolve_path(substitute(ld.recipe, env)), substitute(ld.set, env) or None)
    ckpt = substitute(ld.checkpoint, env) if ld.checkpoint else None
    stage_ckpts = substitute(ld.stage_checkpoints, env) or None
    t = time.perf_counter()
    # overwrite replaces a store only when its resume key differs (recipe, rows, or the SHA-256 of a
    # checkpoint, e.g. a retrained {prev}); a rerun with the same key keeps every committed shard
    res = run_pipeline(recipe, env["store"], out, checkpoint=ckpt, stage_checkpoints=stage_ckpts,
                       overwrite=True, num_cpus=num_cpus)
    _say(f"  labels {ld.name} ({recipe.name}) -> {out}: {res.rows_in} rows in = {res.written} written + "
         f"{res.quarantined} quarantined; shards {res.shards_run} run, {res.shards_skipped} done earlier "
         f"[{time.perf_counter() - t:.0f} s]")
    return out


def plan_experiment(ecfg: ExperimentConfig) -> list[tuple[str, str, Any]]:
    """Resolve every step without running anything: ``[(arm, step, TrainConfig | Recipe)]``.

    Placeholders get stand-in paths (``<step.cam>``...), so every train config (method parameters
    included) and every recipe is validated before hours of training.

    Raises:
        ConfigError / ValueError: an invalid step config or recipe (naming the arm and step).
        KeyError: an unknown placeholder, or one referring to a later step.
    """
    from raysemiseg.pseudolabel.pipeline import load_recipe

    work = Path(ecfg.workdir).resolve()
    env = {"workdir": str(work), "store": str(Path(ecfg.store.path).resolve())}
    if ecfg.split is not None:
        env["split_file"] = str(work / "split.parquet")
    plan: list[tuple[str, str, Any]] = []
    for ld in ecfg.labels:
        plan.append(("(shared)", ld.name, load_recipe(resolve_path(substitute(ld.recipe, env)),
                                                      substitute(ld.set, env) or None)))
        env[f"labels.{ld.name}"] = f"<labels.{ld.name}>"
    for arm in ecfg.arms:
        aenv = dict(env)
        if arm.split is not None:
            aenv["split_file"] = str(work / f"split-{arm.name}.parquet")
        for step in arm.steps:
            where = f"experiment {ecfg.name!r}, arm {arm.name!r}, step {step.name!r}"
            try:
                if step.labels is not None:
                    substitute([ld for ld in (step.labels.checkpoint, step.labels.stage_checkpoints) if ld], aenv)
                    item: Any = load_recipe(resolve_path(substitute(step.labels.recipe, aenv)),
                                            substitute(step.labels.set, aenv) or None)
                    aenv[f"labels.{step.labels.name}"] = env[f"labels.{step.labels.name}"] = f"<labels.{step.labels.name}>"
                else:
                    item = _train_config(ecfg, step, arm.name, aenv, work)
                    item.method.build_params()
                    aenv["prev"] = aenv[f"step.{step.name}"] = f"<{arm.name}.{step.name}>"
                    env[f"arms.{arm.name}.{step.name}"] = aenv["prev"]
            except (ValueError, KeyError) as e:
                raise type(e)(f"{where}: {e.args[0] if e.args else e}") from None
            plan.append((arm.name, step.name, item))
        if arm.also_given_labels:
            from raysemiseg.methods.base import get_method

            last = next(i for a, _, i in reversed(plan) if a == arm.name and hasattr(i, "method"))
            if not get_method(last.method.name).label_conditioned:
                raise ValueError(f"experiment {ecfg.name!r}, arm {arm.name!r}: also_given_labels needs a "
                                 f"label-conditioned method (transfernet, decoupled), not {last.method.name!r}")
    return plan


def run_experiment(ecfg: ExperimentConfig) -> ExperimentResult:
    """Run every arm of ``ecfg`` and write the comparison (see the module docstring).

    Returns:
        :class:`ExperimentResult` (arms in config order, the table).

    Raises:
        ConfigError: a step's resolved train config is invalid (names the key).
        KeyError: an unknown placeholder.
        RuntimeError: a training step produced no checkpoint.
        ValueError / FileNotFoundError: from the store, split, recipe or evaluation.
    """
    from raysemiseg.eval.predict import evaluate_checkpoint
    from raysemiseg.eval.report import iou_bar_chart, write_report
    from raysemiseg.pseudolabel.pipeline import recipe_cpu_need
    from raysemiseg.runtime import ensure_ray
    from raysemiseg.train.driver import cpu_need
    from raysemiseg.tune.tracking import Tracker

    plan = plan_experiment(ecfg)  # fail fast on a bad step, before any training
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    work = Path(ecfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # a local Ray sized for the largest step (its workers + CPUs for Ray Data); too small a budget fails here
    needs = [cpu_need(item) if isinstance(item, TrainConfig) else recipe_cpu_need(item) for _, _, item in plan]
    ensure_ray(num_cpus=ecfg.num_cpus, need=max(needs, key=lambda n: (n.total, n.per_node), default=None))

    t = time.perf_counter()
    store = Path(ecfg.store.path).resolve()
    if ecfg.store.build_from_sample:
        ensure_store(store, ecfg.label_space, ecfg.store.rebuild, ecfg.store.sample)
    from raysemiseg.data.store import open_store

    space = open_store(store).label_space
    env: dict[str, str] = {"workdir": str(work), "store": str(store)}
    if ecfg.split is not None:
        env["split_file"] = str(ensure_split(store, ecfg.split, work / "split.parquet"))
    groups = class_groups(ecfg.split, space)
    timings["store_split_s"] = time.perf_counter() - t

    t = time.perf_counter()
    for ld in ecfg.labels:
        env[f"labels.{ld.name}"] = str(_run_labels(ld, env, work / "labels" / ld.name, ecfg.num_cpus))
    timings["labels_s"] = time.perf_counter() - t

    parent = None
    if ecfg.experiment_tracking:
        probe = _train_config(ecfg, StepDef(name="probe", train={}), ecfg.arms[0].name, env, work)
        if probe.tracking.enabled:
            parent = Tracker.for_run(probe.model_copy(update={"run": probe.run.model_copy(update={"name": ecfg.name})}))
            parent.config = None
            parent.start()
            parent.set_tags({"raysemiseg.kind": "experiment"})
            parent.log_params({"experiment": ecfg.name, "arms": ",".join(a.name for a in ecfg.arms),
                               **{f"set.{k}": v for k, v in ecfg.set.items()}})

    arms: list[ArmResult] = []
    try:
        for arm in ecfg.arms:
            _say(f"arm {arm.name}")
            aenv = dict(env)
            if arm.split is not None:
                aenv["split_file"] = str(ensure_split(store, arm.split, work / f"split-{arm.name}.parquet"))
            last: str | None = None
            train_s = 0.0
            steps: dict[str, str] = {}
            for step in arm.steps:
                if last is not None:
                    aenv["prev"] = str(last)
                if step.labels is not None:
                    out = work / "labels" / f"{arm.name}-{step.labels.name}"
                    made = str(_run_labels(step.labels, aenv, out, ecfg.num_cpus))
                    aenv[f"labels.{step.labels.name}"] = env[f"labels.{step.labels.name}"] = made
                    steps[step.name] = made
                    continue
                cfg = _train_config(ecfg, step, arm.name, aenv, work)
                last, dt = _run_train(cfg, work / "steps" / arm.name / step.name,
                                      parent.run_id if parent is not None else None)
                train_s += dt
                steps[step.name] = aenv[f"step.{step.name}"] = env[f"arms.{arm.name}.{step.name}"] = str(last)
            assert last is not None
            ev = evaluate_checkpoint(last, store, ecfg.eval_split, crf=ecfg.eval_crf, flip=ecfg.eval_flip,
                                     num_samples=ecfg.num_overlays, max_rows=ecfg.eval_max_rows)
            arms.append(ArmResult(arm.name, last, ev, train_s, steps))
            _say(f"arm {arm.name}: {ecfg.eval_split} mIoU {ev.metrics.miou * 100:.2f}% "
                 f"(trained {train_s:.0f} s)")
            if arm.also_given_labels:
                ev = evaluate_checkpoint(last, store, ecfg.eval_split, crf=ecfg.eval_crf, flip=ecfg.eval_flip,
                                         num_samples=ecfg.num_overlays, max_rows=ecfg.eval_max_rows, given_labels=True)
                arms.append(ArmResult(f"{arm.name}-GT", last, ev, train_s, steps))
                _say(f"arm {arm.name}-GT (given image labels): {ecfg.eval_split} mIoU {ev.metrics.miou * 100:.2f}%")
        untrained = None
        if ecfg.compare_untrained:
            untrained = evaluate_checkpoint(arms[0].checkpoint, store, ecfg.eval_split, crf=ecfg.eval_crf,
                                            flip=ecfg.eval_flip, num_samples=0, untrained_head=True,
                                            max_rows=ecfg.eval_max_rows)
        timings["train_eval_s"] = time.perf_counter() - t
        cols = {a.name: a.eval.metrics for a in arms}
        if untrained is not None:
            cols[f"{arms[0].name} untrained head"] = untrained.metrics
        title = (f"{ecfg.name}: {ecfg.eval_split} IoU % ({arms[0].eval.num_images} images"
                 + (", flip TTA" if ecfg.eval_flip else "") + (", dense CRF" if ecfg.eval_crf else "") + ")")
        table = format_comparison(cols, space, groups, title=title)
        files = []
        for a in arms:
            rep = write_report(a.eval, work / "eval" / a.name, title=f"{ecfg.name} / {a.name}")
            files += rep.files
            if parent is not None:
                parent.log_eval(rep, prefix=f"eval_{a.name}")
        chart = iou_bar_chart(arms[0].eval, work / "iou_comparison.png", title=title,
                              compare={a.name: a.eval for a in arms[1:]}, name=arms[0].name)
        files.append(chart)
        summary = {"experiment": ecfg.name, "eval_split": ecfg.eval_split, "groups": groups, "timings": timings,
                   "arms": [{"name": a.name, "checkpoint": str(a.checkpoint), "train_s": a.train_s, "steps": a.steps,
                             "miou": a.eval.metrics.miou,
                             **{f"miou_{g.split()[0]}": a.eval.metrics.miou_over(ids) for g, ids in groups.items()},
                             "iou": {space.names[k]: (None if v != v else float(v))
                                     for k, v in enumerate(a.eval.metrics.iou)}} for a in arms]}
        if untrained is not None:
            summary["untrained_head_miou"] = untrained.metrics.miou
        (work / "results.json").write_text(json.dumps(summary, indent=2))
        (work / "results.md").write_text(f"```\n{table}\n```\n")
        files += [work / "results.json", work / "results.md"]
        if parent is not None:
            parent.log_metrics({f"{a.name}/miou": a.eval.metrics.miou for a in arms})
            parent.log_text(table, "comparison.txt")
            parent.log_artifact(chart)
            parent.end("FINISHED")
    except BaseException:
        if parent is not None:
            parent.end("FAILED")
        raise
    timings["total_s"] = time.perf_counter() - t0
    return ExperimentResult(arms, table, groups, files, timings, untrained)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_experiment_yaml(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The experiment mapping of ``path``, with ``extends: OTHER.yaml`` resolved: OTHER's mapping
    (relative to ``path``'s folder, else the repository root) with this file's keys merged on top
    (mappings merge key by key; lists and scalars replace).

    Raises:
        FileNotFoundError: ``path`` or an extended file is missing.
        ValueError: ``extends`` loops.
    """
    import yaml

    p = Path(resolve_path(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"experiment file {p} does not exist")
    if str(p.resolve()) in _seen:
        raise ValueError(f"experiment {p}: 'extends' loops through {list(_seen)}")
    raw = yaml.safe_load(p.read_text()) or {}
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    pp = p.parent / parent
    base = read_experiment_yaml(pp if pp.is_file() else parent, (*_seen, str(p.resolve())))
    return _deep_merge(base, raw)


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML (``extends`` resolved; ``overrides``: dotted keys, as ``--set``).

    Raises:
        ConfigError: naming the file and each invalid key.
        FileNotFoundError / ValueError: see :func:`read_experiment_yaml`.
    """
    from raysemiseg.config import ConfigError

    try:
        return load_config(read_experiment_yaml(path), model=ExperimentConfig, overrides=overrides)
    except ConfigError as e:
        raise ConfigError(str(e).replace("<dict>", str(path), 1)) from None


def register(subparsers: Any) -> None:
    """Add ``raysemiseg experiment``."""
    p = subparsers.add_parser("experiment", help="train several methods on one split and compare them side by side")
    p.add_argument("config", help="experiment YAML (configs/experiments/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set set.optim.epochs=2 (YAML value syntax)")
    p.add_argument("--dry-run", action="store_true", help="validate and print every step, run nothing")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from raysemiseg.quickstart import parse_overrides

    ecfg = load_experiment(args.config, parse_overrides(args.set))
    if args.dry_run:
        for arm, step, item in plan_experiment(ecfg):
            if hasattr(item, "method"):
                what = (f"train {item.method.name} (stage {item.method.stage}), {item.optim.epochs} x "
                        f"{item.optim.steps_per_epoch or 'one pass'} steps, run {item.run.name}")
            else:
                what = f"pseudo labels: recipe {item.name} ({' -> '.join(s.name for s in item.stages)})"
            print(f"{arm:<20} {step:<14} {what}")
        return 0
    res = run_experiment(ecfg)
    print()
    print(res.table)
    print()
    _say(f"results in {Path(ecfg.workdir).resolve()} (results.md, results.json, iou_comparison.png, eval/<arm>/); "
         "timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in res.timings.items()))
    return 0
