"""``raysemiseg tune SWEEP.yaml``: a Ray Tune sweep around the training driver (see :mod:`raysemiseg.tune.sweep`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` sub-command."""
    p = subparsers.add_parser(
        "tune", help="run a Ray Tune sweep (ASHA on val mIoU, MLflow parent/child runs, best config YAML)",
        description="Run the sweep described by SWEEP.yaml (configs/sweeps/*.yaml): one Ray Train run per "
                    "trial, ASHA early stopping, a results table at the end and the best trial's config "
                    "written to <sweep dir>/best.yaml (usable with `raysemiseg train`).")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--check", action="store_true", help="validate the sweep, print the trial count and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the sweep file, e.g. --set labels.checkpoint=DIR (YAML value syntax)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from raysemiseg.tune.sweep import grid_size, load_sweep, run_sweep

    from raysemiseg.quickstart import parse_overrides

    overrides = parse_overrides(args.set)
    if args.check:
        sweep, base = load_sweep(args.sweep, overrides)
        if sweep.kind == "pseudolabel":
            print(f"sweep {sweep.name!r}: {grid_size(sweep)} trials of recipe {base['recipe'].get('name')!r} on "
                  f"{base['split']!r} images of {base['store']} (max {base['max_rows']}); valid")
        else:
            print(f"sweep {sweep.name!r}: {grid_size(sweep)} trials of method {base['method']['name']!r}, "
                  f"{base['optim']['epochs']} epochs max each; valid")
        return 0
    run_sweep(args.sweep, ray_address=args.ray_address, overrides=overrides)
    return 0
