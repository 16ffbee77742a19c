"""The main job as a Ray job (uses the cluster it is submitted to, else a local Ray).

    ray job submit --working-dir . -- python jobs/quickstart.py [--config configs/quickstart.yaml] [--set k=v]
"""

from __future__ import annotations

import sys

import _common  # noqa: F401  (puts the repository on sys.path)


def main(argv: list[str] | None = None) -> int:
    from raysemiseg.cli import main as cli_main

    return cli_main(["quickstart", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
