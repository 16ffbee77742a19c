"""The one Ray Train loop end to end on the real sample: a worker killed mid-run and the run continuing from
its last checkpoint, reports, checkpoints, MLflow, eval, resume. (One run for both: each Ray Train run costs
the suite ~15 s of start-up.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from raysemiseg.config import load_config
from raysemiseg.eval.predict import evaluate_checkpoint
from raysemiseg.eval.report import write_report
from raysemiseg.train.checkpoint import load_method, read_meta
from raysemiseg.train.driver import train


def test_train_survives_a_killed_worker_reports_checkpoints_tracks_and_resumes(
        ray_session, sample_store, sample_split, runs_dir, make_config) -> None:
    # mixed batches from a C3S split file (2 strong + 2 weak rows per batch, two Ray Data pools);
    # 2 steps per epoch: the checkpoint of epoch 1 exists when rank 0 dies (os._exit) at step 3
    over = {"tracking": {"enabled": True}, "run": {"max_failures": 1, "inject_fault_at_step": 3},
            "data": {"split_file": str(sample_split), "strong_fraction": 0.5, "max_train_rows": 60}}
    cfg = load_config(make_config(sample_store, runs_dir, "loop", **over))
    res = train(cfg)

    # the worker really died and the new attempt started from epoch 1's checkpoint
    assert (runs_dir / "loop" / ".fault_injected").is_file()
    assert res.metrics["epoch"] == 2 and res.metrics["global_step"] == 4
    assert res.metrics["resumed_from_epoch"] == 1
    assert res.metrics["train/strong_fraction"] == 0.5   # every batch: exactly 2 strong of 4
    # every epoch reported (rank 0 metrics), 2 kept checkpoints, scored by val mIoU
    assert 0.0 <= res.metrics["val_miou"] <= 1.0
    assert np.isfinite(res.metrics["train/ce"]) and res.metrics["train/loss"] == res.metrics["train/ce"]
    assert res.best_checkpoint is not None and res.latest_checkpoint is not None
    meta = read_meta(res.latest_checkpoint)
    assert meta["epoch"] == 2 and meta["method"] == "strong_only" and meta["label_space"]["name"] == "voc21"

    # the checkpoint rebuilds the method with identical weights (weights_only load)
    method, cfg2, _ = load_method(res.latest_checkpoint)
    assert cfg2 == cfg
    sd = torch.load(Path(res.latest_checkpoint) / "model.pt", weights_only=True)
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in sd.items())

    # MLflow (embedded sqlite under the storage path): params, per-epoch curves, checkpoint tags
    assert res.tracking_uri == f"sqlite:///{runs_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(res.tracking_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "2" and run.data.params["model.backbone"] == "tiny"
    hist = client.get_metric_history(res.mlflow_run_id, "val_miou")
    assert sorted(m.step for m in hist) == [1, 2]
    assert run.data.tags["raysemiseg.checkpoint.best"] == str(res.best_checkpoint)

    # eval on the checkpoint: table, overlays, bar chart
    ev = evaluate_checkpoint(res.latest_checkpoint, sample_store, "val", num_samples=2, max_rows=4, val_size=96,
                             progress=False)
    assert ev.num_images == 4 and len(ev.samples) == 2
    rep = write_report(ev, runs_dir / "eval")
    assert {p.name for p in rep.files} == {"iou_table.txt", "metrics.json", "overlays.png", "iou_bar.png"}
    assert json.loads((runs_dir / "eval" / "metrics.json").read_text())["miou"] == ev.metrics.miou

    # rerun with the same name and one more epoch: resumes from the last checkpoint, same MLflow run
    cfg3 = load_config(make_config(sample_store, runs_dir, "loop", **over,
                                   optim={"epochs": 3, "steps_per_epoch": 2, "lr": 0.01}))
    res3 = train(cfg3)
    assert res3.metrics["epoch"] == 3 and res3.metrics["resumed_from_epoch"] == 2
    assert res3.metrics["global_step"] == 6
    assert res3.mlflow_run_id == res.mlflow_run_id
    assert sorted(m.step for m in client.get_metric_history(res.mlflow_run_id, "val_miou")) == [1, 2, 3]
