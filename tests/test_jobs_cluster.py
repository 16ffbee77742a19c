"""A real 2-node Ray cluster on one machine (head + worker node, both 127.0.0.1) trains a tiny config
with one Train worker per node, through the unchanged ``jobs/train.py`` entry point.

The nodes use Ray's default node IP: a separate driver cannot join a cluster whose GCS listens on
127.0.0.1 only, because Ray rewrites a localhost bootstrap address to the node IP
(``ray._private.services.resolve_ip_for_localhost``). The dashboard is off.

The cluster runs in a subprocess (``ray.cluster_utils.Cluster``: real GCS, two raylets) so the
test session's own Ray is undisturbed; each node offers one ``train_slot`` custom resource and
each worker asks for one, so the two workers must land on different nodes. On the same cluster, a
config whose storage path is relative is refused before any work starts (each node's workers would
resolve it against their own working directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

CLUSTER_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=2, resources={"train_slot": 1}, object_store_memory=200 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        for cfg in sys.argv[2:]:   # one JSON line per run: exit code, last stdout line, stderr tail
            proc = subprocess.run([sys.executable, sys.argv[1], "--config", cfg, "--address", cluster.address],
                                  env=env, capture_output=True, text=True, timeout=420, cwd=os.path.dirname(cfg))
            lines = proc.stdout.strip().splitlines()
            print(json.dumps({"rc": proc.returncode, "out": lines[-1] if lines else "",
                              "err": proc.stderr[-4000:]}), flush=True)
    finally:
        cluster.shutdown()
""")


def test_two_node_cluster_trains_one_worker_per_node(sample_store, tmp_path) -> None:
    cfg = {
        "data": {"store": str(sample_store), "crop_size": 64, "batch_size": 2, "max_train_rows": 8, "max_val_rows": 4,
                 "val_size": 96},
        "model": {"backbone": "tiny", "pretrained": False},
        "method": {"name": "strong_only", "params": {"head_hidden": 16, "head_dilation": 2}},
        "optim": {"epochs": 1, "steps_per_epoch": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "resources_per_worker": {"train_slot": 1},
                    "placement_strategy": "SPREAD"},
        "run": {"name": "two_nodes", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "tracking": {"enabled": True},
    }
    cfg_path = tmp_path / "two_nodes.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    relative = {**cfg, "run": {**cfg["run"], "name": "relative", "storage_path": "rel-runs"}}
    rel_path = tmp_path / "relative.yaml"
    rel_path.write_text(yaml.safe_dump(relative))
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "jobs" / "train.py"), str(rel_path), str(cfg_path)],
                          capture_output=True, text=True, timeout=560, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    refused, trained = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    # the relative storage path: refused up front (exit 2), saying what to set, nothing written
    assert refused["rc"] == 2, refused["err"]
    assert "run.storage_path='rel-runs' is relative" in refused["err"] and "cluster of 2 nodes" in refused["err"]
    assert "s3://" in refused["err"] and not (tmp_path / "rel-runs").exists()
    assert trained["rc"] == 0, trained["err"]
    out = json.loads(trained["out"])
    assert out["num_workers"] == 2 and out["num_nodes"] == 2
    assert out["epoch"] == 1 and 0.0 <= out["val_miou"] <= 1.0
    assert Path(out["best_checkpoint"]).is_dir()
