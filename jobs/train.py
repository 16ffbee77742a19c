"""Train a config on a Ray cluster or locally.

    ray job submit --working-dir . -- python jobs/train.py --config configs/methods/strong_only.yaml
    python jobs/train.py --config configs/methods/strong_only.yaml --set optim.epochs=2

On a cluster of several nodes every path of the config (data.store, data.split_file,
data.label_store, run.storage_path) must be absolute and on a filesystem every node mounts, or a
URI (run.storage_path: s3://...): anything else is refused before any work starts (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys

import _common  # noqa: F401  (puts the repository on sys.path)


def main(argv: list[str] | None = None) -> int:
    from raysemiseg.config import load_config
    from raysemiseg.quickstart import parse_overrides
    from raysemiseg.runtime import ensure_ray
    from raysemiseg.train.driver import cpu_need, train

    # everything the driver imports later, imported before it joins the cluster: when a job's driver connects,
    # every node's runtime-env agent sets up the job's working dir, and on a test cluster of several raylets on one
    # machine they share one runtime_resources folder, so a module first imported after that moment could be read
    # mid-rewrite (seen once in CI: ModuleNotFoundError for raysemiseg.tune.tracking inside train())
    import raysemiseg.methods  # noqa: F401
    import raysemiseg.train.checkpoint  # noqa: F401
    import raysemiseg.train.loop  # noqa: F401
    import raysemiseg.train.plan  # noqa: F401
    import raysemiseg.tune.tracking  # noqa: F401

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default="auto", help="Ray address (default: the running cluster, else local)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, overrides=parse_overrides(args.set))  # fails before any work starts
        ensure_ray(args.address, need=cpu_need(cfg))  # fails at once when the cluster cannot feed the workers
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs/train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except ValueError as e:  # refused before any work: paths other nodes cannot see, a changed config, a bad plan
        print(f"jobs/train.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": str(result.run_dir), "best_checkpoint": str(result.best_checkpoint),
                      "val_miou": result.metrics.get("val_miou"), "epoch": result.metrics.get("epoch"),
                      "num_workers": result.metrics.get("num_workers"), "num_nodes": result.metrics.get("num_nodes"),
                      "mlflow_run_id": result.mlflow_run_id, "tracking_uri": result.tracking_uri}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
