"""The main job (``raysemiseg quickstart``, ``make quickstart``): real data to tracked mIoU.

Steps, each printed with its time:

1. start a local Ray on 127.0.0.1 (no dashboard; ``$RAY_ADDRESS`` joins a cluster instead);
2. build the Parquet image store from the bundled real COCO sample (mapped to VOC-21), unless
   ``workdir/store`` already holds one;
3. train ``strong_only`` (DeepLab-LargeFOV head on ImageNet EfficientNet-Lite0) with the one Ray
   Train loop; rerunning with the same ``run.name`` resumes from the last checkpoint;
4. evaluate the best checkpoint on the val split (per-class IoU table, overlays, bar chart), and
   the same network with an untrained (randomly initialised) head for comparison;
5. log everything to MLflow and print where it went and how to open it.

Every knob lives in ``configs/quickstart.yaml`` (:class:`QuickstartConfig`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from raysemiseg.config import StrictModel, TrainConfig, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


class QuickstartConfig(StrictModel):
    """``configs/quickstart.yaml``."""

    workdir: str = Field("runs/quickstart", description="store, Ray run, eval reports and mlflow.db go here")
    num_cpus: int = Field(3, ge=1, description="logical CPUs of the local Ray instance")
    rebuild_store: bool = False
    compare_untrained: bool = True
    eval_split: str = "val"
    train: TrainConfig


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def ensure_store(path: str | Path, label_space: str, rebuild: bool = False) -> Path:
    """Build the image store from the bundled sample at ``path`` unless one is there."""
    from raysemiseg.data.sample import sample_sources
    from raysemiseg.data.store import Source, build_store

    p = Path(path)
    if (p / "store.json").is_file() and not rebuild:
        _say(f"store: reusing {p}")
        return p
    res = build_store([Source("coco", (str(a), str(i))) for a, i in sample_sources()], label_space, p)
    _say(f"store: built {p} ({res})")
    return p


def run(qcfg: QuickstartConfig, config_path: str | None = None) -> dict[str, Any]:
    """Run the main job; returns a summary dict (paths, mIoUs, timings)."""
    from raysemiseg.eval.predict import evaluate_checkpoint
    from raysemiseg.eval.report import write_report
    from raysemiseg.train.driver import ensure_ray, train
    from raysemiseg.tune.tracking import Tracker

    t0 = time.perf_counter()
    cfg = qcfg.train
    work = Path(qcfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ensure_ray(num_cpus=qcfg.num_cpus)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    ensure_store(cfg.data.store, cfg.label_space, qcfg.rebuild_store)
    timings["store_s"] = time.perf_counter() - t

    tracker = Tracker.for_run(cfg) if cfg.tracking.enabled else None
    if tracker is not None:
        tracker.start()
        _say(f"MLflow run {tracker.run_id} in {tracker.tracking_uri}")
    t = time.perf_counter()
    _say(f"training {cfg.method.name} / {cfg.model.backbone}: {cfg.optim.epochs} epochs x "
         f"{cfg.optim.steps_per_epoch or 'one pass'} steps, batch {cfg.data.batch_size}, crop {cfg.data.crop_size}")
    try:
        result = train(cfg, tracker=tracker)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    timings["train_s"] = time.perf_counter() - t
    if result.best_checkpoint is None:
        raise RuntimeError(f"run {result.run_dir} produced no checkpoint")
    _say(f"trained in {timings['train_s']:.0f} s; best checkpoint {result.best_checkpoint}")

    t = time.perf_counter()
    ev = evaluate_checkpoint(result.best_checkpoint, cfg.data.store, qcfg.eval_split, crf=cfg.eval.crf,
                             num_samples=cfg.eval.num_overlays)
    reports = {}
    compare = {}
    if qcfg.compare_untrained:
        ev0 = evaluate_checkpoint(result.best_checkpoint, cfg.data.store, qcfg.eval_split, crf=cfg.eval.crf,
                                  num_samples=cfg.eval.num_overlays, untrained_head=True)
        reports["untrained"] = write_report(ev0, work / "eval" / "untrained",
                                            title=f"{qcfg.eval_split}: untrained (random) head")
        compare["untrained head"] = ev0
    reports["trained"] = write_report(ev, work / "eval" / "trained", title=f"{qcfg.eval_split}: trained", compare=compare)
    timings["eval_s"] = time.perf_counter() - t
    if tracker is not None:
        for name, rep in reports.items():
            tracker.log_eval(rep, prefix=f"eval_{name}")
        tracker.end("FINISHED")
    timings["total_s"] = time.perf_counter() - t0

    print()
    print(reports["trained"].table)
    if "untrained" in reports:
        print()
        print(reports["untrained"].table)
    print()
    summary = {
        "miou_trained": ev.metrics.miou,
        "miou_untrained": reports["untrained"].result.metrics.miou if "untrained" in reports else None,
        "best_checkpoint": str(result.best_checkpoint), "run_dir": str(result.run_dir),
        "eval_dir": str(work / "eval"), "mlflow_run_id": result.mlflow_run_id, "tracking_uri": result.tracking_uri,
        "timings": timings,
    }
    _say(f"val mIoU: trained {ev.metrics.miou * 100:.2f}%"
         + (f" vs untrained head {summary['miou_untrained'] * 100:.2f}%" if summary["miou_untrained"] is not None else ""))
    _say("where everything went:")
    print(f"  image store        {Path(cfg.data.store).resolve()}")
    print(f"  Ray Train run      {result.run_dir}  (checkpoints; rerun to resume)")
    print(f"  best checkpoint    {result.best_checkpoint}")
    print(f"  eval reports       {work / 'eval'}/{{trained,untrained}}/ (iou_table.txt, metrics.json, overlays.png, iou_bar.png)")
    if tracker is not None:
        print(f"  MLflow             {tracker.tracking_uri}  run {tracker.run_id}")
        print(f"  open it with       {tracker.ui_command()}")
    print(f"  re-evaluate        raysemiseg eval --checkpoint {result.best_checkpoint} --store {cfg.data.store} --split {qcfg.eval_split} [--crf]")
    _say("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return summary


def register(subparsers: Any) -> None:
    """Add ``raysemiseg quickstart``."""
    p = subparsers.add_parser("quickstart", help="the main job: sample store -> Ray Train -> mIoU tables -> MLflow")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="quickstart YAML (default: configs/quickstart.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.optim.epochs=2 (YAML value syntax)")
    p.set_defaults(func=_cmd)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"] -> {"a.b": 1, "c": [1, 2]}`` (values parsed as YAML).

    Raises:
        ValueError: an item without ``=``.
    """
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _cmd(args: argparse.Namespace) -> int:
    qcfg = load_config(args.config, model=QuickstartConfig, overrides=parse_overrides(args.set))
    run(qcfg, args.config)
    return 0
