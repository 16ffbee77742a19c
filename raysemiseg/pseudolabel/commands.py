"""``raysemiseg pseudolabel`` sub-commands.

::

    raysemiseg pseudolabel RECIPE.yaml --store STORE --out LABELS [--checkpoint CKPT] [--stage-checkpoint STAGE=DIR] [--overwrite]
                           [--gpus-per-model-actor G] [--model-actors MIN MAX] [--num-cpus N] [--max-rows N] [--rows-per-shard N] [--no-progress]
    raysemiseg pseudolabel report LABELS [LABELS ...] --store STORE [--out DIR] [--overlays N] [--mlflow]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

def register(subparsers: Any) -> None:
    """Add ``pseudolabel`` (run a recipe) and ``pseudolabel report`` to the ``raysemiseg`` command."""
    p = subparsers.add_parser(
        "pseudolabel", help="build a pseudo-label store from a recipe, or report label quality",
        description="`raysemiseg pseudolabel RECIPE.yaml --store STORE --out LABELS` runs a recipe on Ray Data "
                    "(resumable); `raysemiseg pseudolabel report LABELS [LABELS ...] --store STORE` scores label "
                    "stores against the image store's pixel masks (mIoU, per-class IoU, overlays).")
    p.add_argument("recipe", metavar="RECIPE.yaml|report", help="recipe YAML (configs/pseudolabel/*.yaml), or 'report'")
    p.add_argument("labels", nargs="*", metavar="LABELS", help="report: label store folders")
    p.add_argument("--store", required=True, help="image store folder")
    p.add_argument("--out", default=None, help="run: label store folder (created; resumed when it exists); "
                                               "report: folder for tables, overlays and summary")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint", default=None, help="training checkpoint directory for model stages")
    g.add_argument("--stage-checkpoint", action="append", default=[], metavar="STAGE=DIR",
                   help="checkpoint of one model stage, e.g. lnet_map=runs/lnet/checkpoint_X (repeatable)")
    g.add_argument("--overwrite", action="store_true",
                   help="relabel everything when --out holds labels of another recipe, row selection or checkpoint "
                        "(without it such a run is refused); labels of the same ones are kept either way")
    g.add_argument("--gpus-per-model-actor", type=float, default=None,
                   help="GPUs each model stage actor asks for (overrides the recipe; 0 = CPU)")
    g.add_argument("--model-actors", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="autoscaling actor pool size of each model stage (overrides the recipe)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance if one is started")
    g.add_argument("--max-rows", type=int, default=None, help="label only the first N selected rows (smoke runs)")
    g.add_argument("--rows-per-shard", type=int, default=None, help="override the recipe's rows_per_shard")
    g.add_argument("--splits", nargs="+", default=None, help="override the recipe's splits (image-store split names)")
    g.add_argument("--no-progress", action="store_true")
    r = p.add_argument_group("report")
    r.add_argument("--overlays", type=int, default=4, help="images per overlay grid")
    r.add_argument("--mlflow", action="store_true", help="log the report to MLflow")
    r.add_argument("--storage-path", default="runs", help="MLflow store folder when no tracking URI is set")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Dispatch ``report`` or a recipe run."""
    if args.recipe == "report":
        if not args.labels:
            raise ValueError("report needs at least one label store folder")
        return _report(args)
    if args.labels:
        raise ValueError(f"unexpected arguments {args.labels}; usage: raysemiseg pseudolabel RECIPE.yaml --store S --out L")
    if not args.out:
        raise ValueError("--out LABELS is required to run a recipe")
    return _run(args)


def parse_stage_checkpoints(values: list[str]) -> dict[str, str]:
    """``["lnet_map=DIR", ...]`` -> ``{"lnet_map": "DIR"}``.

    Raises:
        ValueError: a value without ``=``, with an empty side, or a stage named twice (names the value).
    """
    out: dict[str, str] = {}
    for v in values:
        stage, sep, path = v.partition("=")
        if not sep or not stage.strip() or not path.strip():
            raise ValueError(f"--stage-checkpoint {v!r}: expected STAGE=DIR, e.g. lnet_map=runs/lnet/checkpoint_X")
        if stage in out:
            raise ValueError(f"--stage-checkpoint: stage {stage!r} given twice")
        out[stage.strip()] = path.strip()
    return out


def _run(a: argparse.Namespace) -> int:
    from raysemiseg.pseudolabel.pipeline import load_recipe, run_pipeline

    over: dict[str, Any] = {}
    if a.max_rows is not None:
        over["max_rows"] = a.max_rows
    if a.rows_per_shard is not None:
        over["rows_per_shard"] = a.rows_per_shard
    if a.splits:
        over["splits"] = a.splits
    if a.gpus_per_model_actor is not None:
        over["gpus_per_model_actor"] = a.gpus_per_model_actor
    if a.model_actors is not None:
        over["model_actors"] = tuple(a.model_actors)
    recipe = load_recipe(a.recipe, over)
    r = run_pipeline(recipe, a.store, a.out, checkpoint=a.checkpoint, overwrite=a.overwrite, num_cpus=a.num_cpus,
                     progress=not a.no_progress, stage_checkpoints=parse_stage_checkpoints(a.stage_checkpoint) or None)
    print(f"pseudolabel {recipe.name}: {r.rows_in} rows in -> {r.written} labelled + {r.quarantined} quarantined; "
          f"shards {r.shards_run} run, {r.shards_skipped} already done, of {r.shards_total}; {r.seconds:.1f} s -> {r.out}")
    if r.stage_seconds:
        n = max(1, r.written + r.quarantined) if r.shards_skipped == 0 else None
        parts = [f"{s} {v:.2f} s" + (f" ({1000 * v / n:.1f} ms/img)" if n else "") for s, v in r.stage_seconds.items()]
        print("  stage time: " + ", ".join(parts))
    return 0


def _report(a: argparse.Namespace) -> int:
    from raysemiseg.pseudolabel.report import format_comparison, log_to_mlflow, quality_report

    res = quality_report(a.labels, a.store, a.out, a.overlays)
    for r in res:
        print(r.table)
        print()
    print(format_comparison(res))
    if a.mlflow:
        run_id = log_to_mlflow(res, storage_path=a.storage_path)
        print(f"logged to MLflow run {run_id}")
    if a.out:
        print(f"written to {a.out}", file=sys.stderr)
    return 0
