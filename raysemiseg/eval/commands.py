"""``raysemiseg eval --checkpoint CKPT --store STORE --split val [--flip] [--crf] [--out DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``raysemiseg eval``."""
    p = subparsers.add_parser("eval", help="mIoU, per-class IoU table, overlays and bar chart of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (model.pt, config.yaml, meta.json)")
    p.add_argument("--store", required=True, help="image store directory")
    p.add_argument("--split", default="val")
    p.add_argument("--crf", action="store_true", help="dense-CRF post-processing (DeepLab parameters)")
    p.add_argument("--flip", action="store_true",
                   help="left-right flip test-time augmentation: logits of the image and its mirror averaged (2x the "
                        "forward cost; DeepLab's multi-view test)")
    p.add_argument("--out", default=None, help="report folder (default: CHECKPOINT/eval_<split>[_flip][_crf])")
    p.add_argument("--num-overlays", type=int, default=6)
    p.add_argument("--max-rows", type=int, default=None, help="score only the first N rows")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--given-labels", action="store_true",
                   help="predict with each image's given image-level labels (TransferNet-GT; label-conditioned "
                        "methods: transfernet, decoupled)")
    p.add_argument("--score-space", default=None, metavar="SPACE",
                   help="score in another label space, e.g. voc21 for a Cross-Joint (VOC + COCO union) checkpoint: "
                        "predictions and masks mapped by class name, classes without a counterpart -> background")
    p.add_argument("--mlflow-run", default=None, help="also log the report to this MLflow run id")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from raysemiseg.eval.predict import evaluate_checkpoint
    from raysemiseg.eval.report import write_report

    res = evaluate_checkpoint(args.checkpoint, args.store, args.split, crf=args.crf, num_samples=args.num_overlays,
                              device=args.device, max_rows=args.max_rows, given_labels=args.given_labels or None,
                              score_space=args.score_space, flip=args.flip)
    tag = (f"{args.split}{'_flip' if args.flip else ''}{'_crf' if args.crf else ''}"
           f"{'_given_labels' if args.given_labels else ''}")
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{tag}"
    report = write_report(res, out, title=f"{args.split}{' + flip' if args.flip else ''}{' + CRF' if args.crf else ''}"
                                          f"{' (given labels)' if args.given_labels else ''}: {args.checkpoint}")
    print(report.table)
    print(f"{res.num_images} images in {res.seconds:.1f} s; report in {out}")
    if args.mlflow_run:
        import os

        from raysemiseg.tune.tracking import Tracker

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("--mlflow-run needs MLFLOW_TRACKING_URI")
        tr = Tracker(uri, "", "", "", run_id=args.mlflow_run)
        tr.log_eval(report, prefix=f"eval_{tag}")
    return 0
