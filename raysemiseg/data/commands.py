"""``raysemiseg data ...``: build, summary, split, export-voc, make-sample."""

from __future__ import annotations

import argparse

from raysemiseg.data import sample


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its sub-commands."""
    p = subparsers.add_parser("data", help="build, inspect, split and export the Parquet image store")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    sample.register(sub)
