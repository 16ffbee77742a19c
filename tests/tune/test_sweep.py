"""Ray Tune sweeps: validation before work, the CPU budget, and a tiny real sweep (2 trials, tiny
backbone, 2 epochs x 2 steps) on the shared Ray session with MLflow parent/child runs in a
file-backed (SQLite) store and a best-config YAML that load_config accepts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from raysemiseg.config import ConfigError, load_config
from raysemiseg.tune.sweep import SweepResources, grid_size, load_sweep, plan_concurrency, resolve_values


def write_base(tmp_path: Path, store: Path, split: Path) -> Path:
    base = {
        "label_space": "voc21",
        "data": {"store": str(store), "split_file": str(split), "crop_size": 64, "batch_size": 2,
                 "strong_fraction": 0.5, "val_size": 64, "max_train_rows": 16, "max_val_rows": 4,
                 "scale_range": [0.9, 1.1]},
        "model": {"backbone": "tiny", "pretrained": False},
        "method": {"name": "wssl", "params": {"head_hidden": 16}},
        "optim": {"optimizer": "sgd", "lr": 1e-3, "epochs": 2, "steps_per_epoch": 2, "amp": False},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"name": "base", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "tracking": {"experiment": "sweep-test"},
    }
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def write_sweep(tmp_path: Path, **extra) -> Path:
    sweep = {
        "name": "tiny_bias",
        "base": "base.yaml",
        "search_space": {"b_diff": {"grid": [1.0, 3.0]}},
        "derived": {"method.params.b_fg": {"sum": ["method.params.b_bg", "b_diff"]}},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        **extra,
    }
    sweep["search_space"]["method.params.b_bg"] = {"grid": [3.0]}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(sweep))
    return p


def test_sweep_validation_before_work(tmp_path):
    base = {"data": {"store": "nowhere"}, "model": {"backbone": "tiny"}, "method": {"name": "dual_branch"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    good = {"name": "s", "base": "base.yaml", "search_space": {"method.params.neck_depth": {"grid": [0, 3]},
                                                                "optim.lr": {"loguniform": [1e-5, 1e-3]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(good))
    sweep, base_d = load_sweep(tmp_path / "s.yaml")
    assert grid_size(sweep) == 2 and base_d["method"]["name"] == "dual_branch"
    # trials run in Tune's own folders: the relative store path is the caller's, made absolute
    assert base_d["data"]["store"] == str(Path("nowhere").resolve())
    # --set: nested keys, and the dotted config keys of `overrides` kept whole
    _, over = load_sweep(tmp_path / "s.yaml", {"overrides.optim.epochs": 1, "resources.data_cpus": 0.5})
    assert over["optim"]["epochs"] == 1
    bad_value = {**good, "search_space": {"method.params.neck_depth": {"grid": [0, 4]}}}   # n in 0..3
    (tmp_path / "b1.yaml").write_text(yaml.safe_dump(bad_value))
    with pytest.raises(ConfigError, match="neck_depth"):
        load_sweep(tmp_path / "b1.yaml")
    bad_key = {**good, "search_space": {"method.params.neck_dept": {"grid": [1]}}}
    (tmp_path / "b2.yaml").write_text(yaml.safe_dump(bad_key))
    with pytest.raises(ConfigError, match="neck_dept"):
        load_sweep(tmp_path / "b2.yaml")
    bad_kind = {**good, "search_space": {"optim.lr": {"normal": [0, 1]}}}
    (tmp_path / "b3.yaml").write_text(yaml.safe_dump(bad_kind))
    with pytest.raises(ConfigError, match="grid"):
        load_sweep(tmp_path / "b3.yaml")
    assert resolve_values({"a": 2.0, "d": 3.0}, {"x.b": {"sum": ["a", "d"]}}) == {"a": 2.0, "d": 3.0, "x.b": 5.0}


def test_concurrency_budget_cannot_starve_data():
    import os

    from raysemiseg.tune.sweep import local_cpus, trial_resources

    base = {"scaling": {"num_workers": 1, "cpus_per_worker": 1.0}}
    res = SweepResources(driver_cpus=0.0, data_cpus=1.0)
    need = trial_resources(base, res)
    assert need == {"CPU": 2.0}                          # 0 driver + 1 worker x 1 + 1 data
    assert local_cpus(res) == max(os.cpu_count() or 1, 2) + 1 and local_cpus(SweepResources(local_num_cpus=5)) == 5
    assert plan_concurrency({"CPU": local_cpus(res)}, need) >= 1     # a local sweep always fits one trial
    assert plan_concurrency({"CPU": 2}, need) == 1        # 2-CPU machine: one trial at a time
    assert plan_concurrency({"CPU": 4}, need) == 2
    assert plan_concurrency({"CPU": 8}, need, cap=3) == 3
    with pytest.raises(ValueError, match="only 1 trials"):
        plan_concurrency({"CPU": 2}, need, cap=2)


def test_concurrency_plans_from_trial_resources_and_the_autoscaler_max(caplog):
    """The shipped cluster.yaml: an 8-CPU head (no GPU) now, up to 4 g5 workers of 8 CPUs + 1 GPU."""
    from raysemiseg.tune.sweep import trial_resources

    gpu2 = {"scaling": {"num_workers": 2, "cpus_per_worker": 7.0, "use_gpu": True,
                        "resources_per_worker": {"train_slot": 1.0}}}
    need = trial_resources(gpu2, SweepResources(driver_cpus=0.5, data_cpus=1.0))
    assert need == {"CPU": 15.5, "GPU": 2.0, "train_slot": 2.0}          # 0.5 + 2 x 7 + 1; 2 x 1 GPU; 2 x 1 slot
    need = trial_resources({"scaling": {"num_workers": 2, "cpus_per_worker": 7.0, "use_gpu": True}}, SweepResources())
    assert need == {"CPU": 15.0, "GPU": 2.0}
    head_now = {"CPU": 8.0, "memory": 3e10}
    most = {"CPU": 40.0, "GPU": 4.0}                                   # 8 + 4 x 8 CPUs, 4 x 1 GPU
    with caplog.at_level("WARNING", logger="raysemiseg.tune.sweep"):
        # was: ValueError "one trial needs 15 CPUs but the cluster has 8"
        assert plan_concurrency(head_now, need, max_cluster=most) == 2   # min(floor(40/15)=2, floor(4/2)=2)
    assert "wait for the autoscaler" in caplog.text
    one = trial_resources({"scaling": {"num_workers": 1, "cpus_per_worker": 7.0, "use_gpu": True}}, SweepResources())
    assert one == {"CPU": 8.0, "GPU": 1.0}
    assert plan_concurrency(head_now, one, max_cluster=most) == 4        # GPUs decide: min(40/8=5, 4/1=4)
    assert plan_concurrency(head_now, one, cap=3, max_cluster=most) == 3
    with pytest.raises(ValueError, match="max_concurrent_trials=5 but only 4 trials"):
        plan_concurrency(head_now, one, cap=5, max_cluster=most)
    # GPUs decide on a fixed cluster too: 32 CPUs would hold 16 trials of 2 CPUs, 2 GPUs hold 2
    assert plan_concurrency({"CPU": 32.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}) == 2
    # never fits, even at the maximum: refused before any work
    with pytest.raises(ValueError, match="can never run"):
        plan_concurrency(head_now, {"CPU": 8.0, "GPU": 8.0}, max_cluster=most)
    # too small now and no known maximum: Tune queues the trials (max_concurrent_trials unset, or the cap)
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysemiseg.tune.sweep"):
        assert plan_concurrency(head_now, need) is None
    assert "wait in Tune's queue" in caplog.text
    assert plan_concurrency(head_now, need, cap=2) == 2


def created_placement_groups() -> set[str]:
    """Ids of the placement groups that still hold resources."""
    import ray

    return {pid for pid, pg in ray.util.placement_group_table().items() if pg["state"] == "CREATED"}


STATE_API_SCRIPT = """
import ray
from raysemiseg.tune.sweep import require_state_api
ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
try:
    require_state_api(timeout_s=5)
except RuntimeError as e:
    print("REFUSED:", e)
"""


def test_sweep_refuses_a_cluster_without_state_api(tmp_path):
    """A cluster without the dashboard cannot free a stopped trial's workers: refused up front."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", STATE_API_SCRIPT], capture_output=True, text=True, timeout=180,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED: a Tune sweep needs Ray's State API" in proc.stdout and "--include-dashboard" in proc.stdout


def test_state_api_is_asked_at_the_connected_cluster(ray_session):
    """The State API check goes to this process's cluster (its GCS address), not whichever Ray
    instance of the host is found first (other Ray instances run on this machine)."""
    from raysemiseg.tune.sweep import require_state_api, state_api_address

    assert state_api_address() == "http://" + ray_session._private.worker.global_worker.node.address_info["webui_url"]
    require_state_api(timeout_s=30)


def test_tiny_real_sweep_tracks_parent_and_children(ray_session, sample_store, sample_split, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from raysemiseg.tune.sweep import run_sweep
    from raysemiseg.tune.tracking import Tracker, resolve_tracking_uri

    write_base(tmp_path, sample_store, sample_split)
    # an earlier sweep of the same folder with other settings: a new invocation gets its own parent run
    # (reopening that one made MLflow refuse the changed params)
    uri, art = resolve_tracking_uri(None, str(tmp_path / "runs" / "sweeps"))
    earlier = Tracker(uri, "sweep-test", run_name="tiny_bias", run_key=str(tmp_path / "runs" / "sweeps" / "tiny_bias"),
                      artifact_location=art)
    earlier.start()
    earlier.log_params({"sweep": {"scheduler": {"grace_period": 99}}})
    earlier.end("FINISHED")
    before = created_placement_groups()
    # the sweep folder as a URI (was refused: "must be local"); MLflow's SQLite store lands in its folder
    sweeps_uri = (tmp_path / "runs" / "sweeps").as_uri()
    result = run_sweep(write_sweep(tmp_path, storage_path=sweeps_uri))
    assert result.sweep_dir == f"{sweeps_uri}/tiny_bias" and result.best_config_path == f"{sweeps_uri}/tiny_bias/best.yaml"
    assert (tmp_path / "runs" / "sweeps" / "tiny_bias" / "tune").is_dir()       # Tune's experiment under the URI
    assert result.parent_run_id != earlier.run_id
    out = capsys.readouterr().out
    assert "sweep tiny_bias: 2 trials" in out and "best:" in out
    assert len(result.rows) == 2 and result.concurrency == 2   # the test session has 4 logical CPUs
    assert all(r["status"] in ("finished", "early-stopped") for r in result.rows), result.table
    assert {r["values"]["method.params.b_fg"] for r in result.rows} == {4.0, 6.0}
    assert any(r["status"] == "finished" for r in result.rows)

    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert result.tracking_uri.startswith("sqlite:///") and Path(result.tracking_uri[10:]).is_file()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and "best_val_miou" in parent.data.metrics
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        assert child.data.params["method.name"] == "wssl"
        assert child.data.params["sweep.b_diff"] in ("1.0", "3.0")
        assert "final/val_miou" in child.data.metrics
        assert any(k.startswith("final/val_iou/") for k in child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "val_miou")) >= 1

    # every trial Tune stopped (here at max_t) has its Train workers' placement group freed, so the
    # next trial of a small cluster gets its CPUs (without the State API it stayed reserved for good)
    deadline = time.monotonic() + 30
    while created_placement_groups() - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not created_placement_groups() - before, "a stopped trial's placement group was never removed"

    cfg = load_config(tmp_path / "runs" / "sweeps" / "tiny_bias" / "best.yaml")
    assert cfg.method.name == "wssl" and cfg.run.name == "tiny_bias-best"
    best = result.rows[0]
    assert cfg.method.params["b_fg"] == best["values"]["method.params.b_fg"]
    assert cfg.run.storage_path == str(tmp_path / "runs")


def test_reconcile_replays_tune_record_when_callback_was_cut_off(tmp_path):
    """A trial stopped by ASHA before its MLflow callback logged gets Tune's record replayed."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from raysemiseg.tune.sweep import reconcile_children

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("rec", artifact_location=str(tmp_path / "art"))
    parent = c.create_run(exp)
    child = c.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "raysemiseg.trial_id": "t1"})
    c.set_terminated(child.info.run_id, status="FAILED")        # the interrupted trial function
    rows = [{"trial": "t1", "status": "early-stopped", "epochs": 2,
             "history": [{"val_miou": 0.25, "val_iou/person": 0.4}, {"val_miou": 0.5, "val_iou/person": 0.75}]}]
    reconcile_children(SimpleNamespace(client=c, experiment="rec", run_id=parent.info.run_id), rows)
    run = c.get_run(child.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["raysemiseg.early_stopped"] == "true"
    assert [m.value for m in c.get_metric_history(run.info.run_id, "val_miou")] == [0.25, 0.5]
    assert run.data.metrics["final/val_miou"] == 0.5 and run.data.metrics["final/val_iou/person"] == 0.75
