"""A training run whose worker process dies mid-way continues from its last checkpoint and finishes."""

from __future__ import annotations

from raysemiseg.config import load_config
from raysemiseg.train.driver import train


def test_killed_worker_resumes_from_last_checkpoint(ray_session, sample_store, runs_dir, make_config) -> None:
    # 2 steps per epoch: the checkpoint of epoch 1 exists when rank 0 dies (os._exit) at step 3
    cfg = load_config(make_config(sample_store, runs_dir, "fault", optim={"epochs": 2, "steps_per_epoch": 2},
                                  run={"max_failures": 1, "inject_fault_at_step": 3}))
    res = train(cfg)
    assert (runs_dir / "fault" / ".fault_injected").is_file()          # the worker really died
    assert res.metrics["epoch"] == 2 and res.metrics["global_step"] == 4
    assert res.metrics["resumed_from_epoch"] == 1                       # the new attempt started from epoch 1's checkpoint
