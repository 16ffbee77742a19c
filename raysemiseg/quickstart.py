"""The main job (``raysemiseg quickstart``, ``make quickstart``): real data to tracked mIoU.

Steps, each printed with its time (an experiment, :mod:`raysemiseg.experiment`):

1. start a local Ray on 127.0.0.1 (no dashboard; ``$RAY_ADDRESS`` joins a cluster instead);
2. build the Parquet image store from the bundled real PASCAL VOC 2012 sample
   (``raysemiseg/sample_data/voc2012-sample``: 326 train / 150 val images, genuine masks, boxes
   derived from the masks), unless the configured store folder already holds one, and an I3S split:
   25% of the training images strong (pixel masks), 75% weak (boxes + image labels);
3. Bbox-Rect pseudo labels for the training images with the Ray Data pseudo-label engine (Parquet);
4. train ``strong_only`` (DeepLab-LargeFOV head on ImageNet EfficientNet-Lite0) on the strong images
   and ``dual_branch`` (Luo & Yang 2020) on strong + weak images, same step budget, with the one Ray
   Train loop; rerunning resumes (finished steps are skipped, a killed one continues from its last
   checkpoint);
5. evaluate both on the val split and print their per-class IoU side by side (plus the untrained-head
   network), with overlays and bar charts;
6. log everything to MLflow (a parent run with the comparison, a child run per training) and print
   where it went and how to open it.

Every knob lives in ``configs/quickstart.yaml`` (an :class:`~raysemiseg.experiment.ExperimentConfig`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from raysemiseg.experiment import ExperimentConfig, ensure_store, load_experiment, run_experiment  # noqa: F401

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def run(qcfg: ExperimentConfig, config_path: str | None = None) -> dict[str, Any]:
    """Run the main job; returns a summary dict (paths, mIoUs, timings)."""
    res = run_experiment(qcfg)
    work = Path(qcfg.workdir).resolve()
    print()
    print(res.table)
    print()
    mious = {a.name: a.eval.metrics.miou for a in res.arms}
    summary = {"miou": mious, "miou_untrained": res.untrained.metrics.miou if res.untrained is not None else None,
               "checkpoints": {a.name: str(a.checkpoint) for a in res.arms}, "workdir": str(work),
               "timings": res.timings}
    _say("val mIoU: " + ", ".join(f"{k} {v * 100:.2f}%" for k, v in mious.items())
         + (f", untrained head {summary['miou_untrained'] * 100:.2f}%" if res.untrained is not None else ""))
    _say("where everything went:")
    print(f"  image store        {Path(qcfg.store.path).resolve()}")
    print(f"  split              {work / 'split.parquet'}")
    print(f"  pseudo labels      {work / 'labels'}/")
    for a in res.arms:
        print(f"  {a.name:<18} {a.checkpoint}")
    print(f"  comparison         {work / 'results.md'}, {work / 'results.json'}, {work / 'iou_comparison.png'}")
    print(f"  per-arm reports    {work / 'eval'}/<arm>/ (iou_table.txt, metrics.json, overlays.png, iou_bar.png)")
    db = work / "runs" / "mlflow.db"
    if db.is_file():
        print(f"  MLflow             sqlite:///{db}")
        print(f"  open it with       mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1")
    first = res.arms[0]
    print(f"  re-evaluate        raysemiseg eval --checkpoint {first.checkpoint} --store {qcfg.store.path} "
          f"--split {qcfg.eval_split} [--crf]")
    _say("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in res.timings.items()))
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
    qcfg = load_experiment(args.config, parse_overrides(args.set))
    run(qcfg, args.config)
    return 0
