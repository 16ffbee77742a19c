"""The ``raysemiseg`` command: ``data``, ``pseudolabel``, ``train``, ``tune``, ``eval``, ``quickstart``.

Each area keeps its own sub-commands in a ``commands`` module exposing
``register(subparsers) -> None``; each registered parser sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that register sub-commands, in the order they appear in ``--help``
COMMAND_MODULES: tuple[str, ...] = (
    "raysemiseg.data.commands",
    "raysemiseg.pseudolabel.commands",
    "raysemiseg.tune.commands",
    "raysemiseg.train.commands",
    "raysemiseg.eval.commands",
    "raysemiseg.experiment",
    "raysemiseg.quickstart",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all areas registered)."""
    parser = argparse.ArgumentParser(
        prog="raysemiseg",
        description="Semantic segmentation from cheap labels at cluster scale (Ray + PyTorch + MLflow).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # user errors: one clear line, no traceback (set RAYSEMISEG_DEBUG=1 for one)
        import os

        if os.environ.get("RAYSEMISEG_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"raysemiseg {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
