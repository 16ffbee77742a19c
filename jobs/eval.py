"""Evaluate a checkpoint on a store split (runs where the driver runs; no Ray cluster needed).

    ray job submit --working-dir . -- python jobs/eval.py --checkpoint CKPT --store STORE --split val [--crf]
"""

from __future__ import annotations

import sys

import _common  # noqa: F401  (puts the repository on sys.path)


def main(argv: list[str] | None = None) -> int:
    from raysemiseg.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
