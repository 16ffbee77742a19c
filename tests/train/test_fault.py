"""A training run whose worker process dies mid-way continues from its last checkpoint and finishes."""

from __future__ import annotations

from raysemiseg.config import load_config
from raysemiseg.train.driver import train


def test_killed_worker_resumes_from_last_checkpoint(ray_session, sample_store, sample_split, runs_dir,
                                                     make_config) -> None:
    # mixed batches from a C3S split file (2 strong + 2 weak rows per batch, two Ray Data pools);
    # 2 steps per epoch: the checkpoint of epoch 1 exists when rank 0 dies (os._exit) at step 3
    cfg = load_config(make_config(sample_store, runs_dir, "fault", optim={"epochs": 2, "steps_per_epoch": 2},
                                  data={"split_file": str(sample_split), "strong_fraction": 0.5, "max_train_rows": 60},
                                  run={"max_failures": 1, "inject_fault_at_step": 3}))
    res = train(cfg)
    assert (runs_dir / "fault" / ".fault_injected").is_file()          # the worker really died
    assert res.metrics["epoch"] == 2 and res.metrics["global_step"] == 4
    assert res.metrics["resumed_from_epoch"] == 1                       # the new attempt started from epoch 1's checkpoint
    assert res.metrics["train/strong_fraction"] == 0.5                  # every batch: exactly 2 strong of 4
