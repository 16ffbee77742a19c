"""The main job as a Ray job (uses the cluster it is submitted to, else a local Ray).

    ray job submit --working-dir . -- python jobs/quickstart.py [--config configs/quickstart.yaml] [--set k=v]

On a cluster of several nodes the experiment's ``workdir`` and ``store.path`` (the image store,
label stores, Ray runs and MLflow store go there) must be absolute paths on a filesystem every node
mounts (e.g. ``--set workdir=/mnt/shared/quickstart --set store.path=/mnt/shared/quickstart/store``):
the shipped relative ``runs/quickstart`` would resolve inside each node's copy of the working
directory, so it is refused before any work starts (exit 2).
"""

from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (puts the repository on sys.path)


def main(argv: list[str] | None = None) -> int:
    from raysemiseg.cli import main as cli_main
    from raysemiseg.experiment import load_experiment
    from raysemiseg.quickstart import DEFAULT_CONFIG, parse_overrides
    from raysemiseg.runtime import ensure_ray
    from raysemiseg.storage import require_shared_paths

    args = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", action="append", default=[])
    known, _ = p.parse_known_args(args)
    try:
        ecfg = load_experiment(known.config, parse_overrides(known.set))
        ensure_ray(num_cpus=ecfg.num_cpus)
        require_shared_paths({"workdir": ecfg.workdir, "store.path": ecfg.store.path}, what="the quickstart job")
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs/quickstart.py: error: {e}", file=sys.stderr)
        return 2
    return cli_main(["quickstart", *args])


if __name__ == "__main__":
    sys.exit(main())
