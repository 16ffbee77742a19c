"""Every shipped ``configs/methods/*.yaml`` validates and trains (at smoke size: tiny backbone, 64 px
crops, 2 steps) through ``jobs/train.py``, the entry point ``ray job submit`` runs; one of them goes
through a real ``ray job submit`` to a 2-node Ray cluster (head with its job server on 127.0.0.1 + a
worker node), one Train worker per node.

Only the sizes and the prepared inputs are overridden (store, split file, label store, the
Cross-Pretrain checkpoint, which the configs' comments say how to prepare): every method section
(method, stage, parameters, strong fraction) is the shipped one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raysemiseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
# trained at smoke size through the job entry point: the multi-stage, two-optimizer-group config
# (lnet_pnet) and the online-E-step one (wssl_fixed_semi); dual_branch.yaml trains through a real
# `ray job submit` below. Every method's own training (compute_losses through the loop's train_step) is
# the learning check's job (tests/methods/test_learning.py, one test per registered method); every config
# is validated here, method parameters included (CI time: each run through Ray Train costs ~20 s).
TRAINED = [p for p in CONFIGS if p.stem in {"wssl_fixed_semi", "lnet_pnet"}]
SUBMITTED = ROOT / "configs" / "methods" / "dual_branch.yaml"
SMOKE = {"data.crop_size": 64, "data.batch_size": 4, "data.max_train_rows": 24, "data.max_val_rows": 4,
         "data.val_size": 96, "data.shuffle_buffer": 8, "model.backbone": "tiny", "model.pretrained": False,
         "optim.epochs": 1, "optim.steps_per_epoch": 2, "optim.amp": False, "scaling.num_workers": 1,
         "scaling.cpus_per_worker": 1, "scaling.use_gpu": False, "run.max_failures": 0, "tracking.enabled": False}


def test_every_method_config_validates_and_every_method_has_one() -> None:
    from raysemiseg.methods.base import METHODS, get_method

    names = set()
    for p in CONFIGS:
        cfg = load_config(p)
        get_method(cfg.method.name)
        cfg.method.build_params()
        names.add(cfg.method.name)
    seed_methods = {"strong_only", "wssl", "dual_branch", "decoupled", "transfernet", "lnet", "lnet_pnet"}
    assert seed_methods <= names <= set(METHODS)
    # two configs train in-process below, dual_branch through `ray job submit`; every method learns in
    # tests/methods/test_learning.py (its registry parametrization fails for a method without a spec)
    trained = {load_config(p).method.name for p in TRAINED} | {load_config(SUBMITTED).method.name}
    assert trained == {"wssl", "lnet_pnet", "dual_branch"} and len(TRAINED) == 2


@pytest.fixture(scope="module")
def prepared(sample_store, tmp_path_factory) -> dict[str, str]:
    """The inputs the configs' comments say to prepare, made from the sample store."""
    import torch

    from raysemiseg.data.splits import SplitSpec, make_split, write_split
    from raysemiseg.labels import builtin
    from raysemiseg.methods.base import get_method
    from raysemiseg.pseudolabel.pipeline import load_recipe, run_pipeline
    from raysemiseg.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("prepared")
    out = {"store": str(sample_store),
           "i3s": str(write_split(make_split(sample_store, SplitSpec("i3s-fraction", fraction=0.25, seed=0)),
                                  root / "i3s-25-seed0.parquet")),
           "c3s": str(write_split(make_split(sample_store, SplitSpec("c3s", split_set=1)), root / "c3s-1-seed0.parquet"))}
    run_pipeline(load_recipe(ROOT / "configs/pseudolabel/bbox_rect.yaml", {"splits": ["train"]}), sample_store,
                 root / "labels-bbox-rect", progress=False)
    out["labels"] = str(root / "labels-bbox-rect")
    # Cross-Pretrain source: a tiny COCO-80 WSSL network (the config replaces its classifier)
    cross = load_config(ROOT / "configs/methods/wssl_cross_pretrain.yaml",
                        overrides={**SMOKE, "label_space": "coco80", "method.params.init_from": None})
    torch.manual_seed(0)
    m = get_method("wssl")(builtin("coco80"), cross.model, cross.method.build_params())
    out["cross"] = str(save_checkpoint(root / "coco80-pretrain", m, cross, builtin("coco80")))
    return out


def smoke_values(config: Path, prepared: dict[str, str], runs: Path) -> dict[str, object]:
    """Dotted overrides of ``config``: the smoke sizes plus the prepared inputs."""
    raw = yaml.safe_load(config.read_text())
    over = {**SMOKE, "data.store": prepared["store"], "run.storage_path": str(runs)}
    split = (raw.get("data") or {}).get("split_file")
    if split:
        over["data.split_file"] = prepared["c3s" if "c3s" in split else "i3s"]
    if (raw.get("data") or {}).get("label_store"):
        over["data.label_store"] = prepared["labels"]
    if ((raw.get("method") or {}).get("params") or {}).get("init_from"):
        over["method.params.init_from"] = prepared["cross"]
    return over


def set_items(over: dict[str, object]) -> list[str]:
    """``--set KEY=VALUE`` items for ``jobs/train.py`` (values as JSON, which YAML reads)."""
    return [f"{k}={json.dumps(v)}" for k, v in over.items()]


@pytest.mark.slow
@pytest.mark.parametrize("config", TRAINED, ids=[p.stem for p in TRAINED])
def test_method_config_trains_through_the_job_entry_point(ray_session, prepared, config, tmp_path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import train as train_job
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    argv = ["--config", str(config)]
    for item in set_items(smoke_values(config, prepared, tmp_path / "runs")):
        argv += ["--set", item]
    assert train_job.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epoch"] == 1 and 0.0 <= out["val_miou"] <= 1.0
    assert (Path(out["best_checkpoint"]) / "model.pt").is_file()
    saved = load_config(Path(out["best_checkpoint"]) / "config.yaml")
    shipped = load_config(config)
    assert (saved.method.name, saved.method.stage) == (shipped.method.name, shipped.method.stage)
    assert saved.data.strong_fraction == shipped.data.strong_fraction


JOB_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from ray.cluster_utils import Cluster

    port, agent_ports, root, relative, args = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4], sys.argv[5:]
    # two nodes, each offering one `train_slot`; the job agents get their own HTTP ports (the default one,
    # 52365, is taken by any other Ray on the machine)
    node = dict(num_cpus=2, resources={"train_slot": 1}, object_store_memory=200 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        dashboard_agent_listen_port=int(agent_ports[0])))
    cluster.add_node(**node, dashboard_agent_listen_port=int(agent_ports[1]))
    cluster.wait_for_nodes()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        # a driver of its own with a relative storage path: refused before any work (one JSON line)
        proc = subprocess.run([sys.executable, "jobs/train.py", "--config", relative, "--address", cluster.address],
                              env=env, capture_output=True, text=True, timeout=300, cwd=root)
        print(json.dumps({"rc": proc.returncode, "err": proc.stderr[-4000:]}), flush=True)
        for attempt in range(20):  # the head's job agent starts a few seconds after the head
            proc = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{port}",
                                   "--working-dir", root, "--", "python", "jobs/train.py", *args],
                                  env=env, capture_output=True, text=True, timeout=420, cwd=root)
            if "No available agent" not in proc.stderr:
                break
            time.sleep(3)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr[-6000:])
        sys.exit(proc.returncode)
    finally:
        cluster.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_trains_a_method_config_one_worker_per_node(prepared, tmp_path) -> None:
    """``ray job submit --working-dir . -- python jobs/train.py --config configs/methods/dual_branch.yaml``
    (README, "Running on a cluster") against a real 2-node cluster (``ray.cluster_utils.Cluster``: a real
    GCS, two raylets, the head's job server on 127.0.0.1), run in a subprocess so the test session's own
    Ray is undisturbed. Each node offers one ``train_slot`` and each of the 2 Train workers asks for one,
    so they must land on different nodes (DDP across nodes). The job's own output carries the training
    result, and ``ray job submit`` exits 0 only when the job SUCCEEDED.

    On the same cluster, a driver of its own whose storage path is relative is refused before any work
    starts (each node's workers would resolve it against their own working directory). The nodes use
    Ray's default node IP: a separate driver cannot join a cluster whose GCS listens on 127.0.0.1 only
    (Ray rewrites a localhost bootstrap address to the node IP, ``resolve_ip_for_localhost``)."""
    config = SUBMITTED
    args = ["--config", str(config.relative_to(ROOT))]
    two_nodes = {"scaling.num_workers": 2, "scaling.resources_per_worker": {"train_slot": 1},
                 "scaling.placement_strategy": "SPREAD"}
    over = {**smoke_values(config, prepared, tmp_path / "runs"), **two_nodes}
    for item in set_items(over):
        args += ["--set", item]
    relative = load_config(config, overrides={**over, "run.name": "relative", "run.storage_path": "rel-runs"})
    rel_path = tmp_path / "relative.yaml"
    rel_path.write_text(yaml.safe_dump(relative.model_dump(mode="json")))
    script = tmp_path / "submit.py"
    script.write_text(JOB_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the head runs job entrypoints with its own PATH: this interpreter's `python` first, as on a cluster
    # node whose image has the package installed
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), f"{_free_port()},{_free_port()}",
                           str(ROOT), str(rel_path), *args],
                          capture_output=True, text=True, timeout=560, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    refused = json.loads(proc.stdout.splitlines()[0])
    # the relative storage path: refused up front (exit 2), saying what to set, nothing written
    assert refused["rc"] == 2, refused["err"]
    assert "run.storage_path='rel-runs' is relative" in refused["err"] and "cluster of 2 nodes" in refused["err"]
    assert "s3://" in refused["err"] and not (ROOT / "rel-runs").exists()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    assert re.search(r"Job 'raysubmit_\w+' succeeded", plain), plain[-2000:]
    result = next(json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"run_dir"'))
    assert result["num_workers"] == 2 and result["num_nodes"] == 2
    assert result["epoch"] == 1 and 0.0 <= result["val_miou"] <= 1.0
    assert (Path(result["best_checkpoint"]) / "model.pt").is_file()
