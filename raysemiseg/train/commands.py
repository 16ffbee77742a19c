"""``raysemiseg train CONFIG.yaml [--set key=value ...] [--num-cpus N]``: one Ray Train run of any method."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``raysemiseg train``."""
    p = subparsers.add_parser("train", help="train any registered method with the one Ray Train loop")
    p.add_argument("config", help="run config YAML (see configs/methods/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.01 (YAML value syntax)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray if one is started (default: the workers' CPUs + 1 for Ray "
                        "Data, at least the cores)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from raysemiseg.config import load_config
    from raysemiseg.quickstart import parse_overrides
    from raysemiseg.train.driver import train

    cfg = load_config(args.config, overrides=parse_overrides(args.set))  # fails before any work starts
    result = train(cfg, ray_address=args.address, num_cpus=args.num_cpus)
    print(json.dumps({"run_dir": str(result.run_dir), "best_checkpoint": str(result.best_checkpoint),
                      "val_miou": result.metrics.get("val_miou"), "mlflow_run_id": result.mlflow_run_id,
                      "tracking_uri": result.tracking_uri}, indent=2))
    return 0
