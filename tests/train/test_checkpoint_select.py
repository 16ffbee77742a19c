"""Which checkpoint a run hands on (``{prev}``, the experiment's final evaluation): the best by val
mIoU with exact ties going to the later checkpoint, and the latest one for auxiliary stages
(``Method.AUX_STAGES``), whose val mIoU scores a frozen or untrained segmenter (review rows X20, L3).

Candidates are built as Ray's ``Result.best_checkpoints`` lists them: ascending by score, equal
scores in report order (``ray.train._internal.checkpoint_manager._insert_into_sorted_list``)."""

from __future__ import annotations

import math

import pytest

from raysemiseg.config import load_config
from raysemiseg.train.driver import checkpoint_rule, select_checkpoint


def cands(*rows: tuple[str, float, int]) -> list[tuple[str, dict]]:
    """(name, val_miou, global_step) -> [(name, metrics)] in the given order."""
    return [(name, {"val_miou": v, "global_step": s, "epoch": s // 25}) for name, v, s in rows]


def test_ties_go_to_the_later_checkpoint() -> None:
    """A frozen segmenter scores 0.0312 at every epoch; epochs 1 and 2 kept (num_to_keep 2): the
    epoch-2 checkpoint (global_step 50) is handed on, not epoch 1 (half the steps thrown away)."""
    tied = cands(("ep1", 0.0312, 25), ("ep2", 0.0312, 50))
    assert select_checkpoint(tied) == "ep2"
    assert select_checkpoint(list(reversed(tied))) == "ep2"  # by global_step, not list position
    # epochs 3 and 4 of a 4-epoch run kept: epoch 4
    assert select_checkpoint(cands(("ep3", 0.25, 75), ("ep4", 0.25, 100))) == "ep4"


def test_best_by_val_miou_otherwise() -> None:
    c = cands(("ep4", 0.20, 100), ("ep2", 0.31, 50))
    assert select_checkpoint(c) == "ep2"
    # a NaN score never wins over a number
    assert select_checkpoint(cands(("nan", math.nan, 100), ("ep1", 0.1, 25))) == "ep1"
    assert select_checkpoint([]) is None


def test_latest_rule_ignores_val_miou() -> None:
    """An auxiliary stage: the latest checkpoint (highest global_step), whatever its val mIoU."""
    c = cands(("ep2", 0.40, 50), ("ep1", 0.45, 25), ("ep3", 0.10, 75))
    assert select_checkpoint(c, "latest") == "ep3"
    assert select_checkpoint(c, "latest", latest="ray-latest") == "ray-latest"  # Ray's own latest wins
    with pytest.raises(ValueError, match="'newest'.*best.*latest"):
        select_checkpoint(c, "newest")


@pytest.mark.parametrize("method,stage,rule", [
    ("lnet", "lnet", "latest"), ("lnet", "segment", "best"), ("lnet", "default", "best"),
    ("lnet_pnet", "lnet", "latest"), ("lnet_pnet", "pretrain_pnet", "latest"), ("lnet_pnet", "joint", "best"),
    ("strong_only", "default", "best"),
])
def test_checkpoint_rule_from_the_methods_aux_stages(method: str, stage: str, rule: str) -> None:
    cfg = load_config({"data": {"store": "unused"}, "method": {"name": method, "stage": stage}})
    assert checkpoint_rule(cfg) == rule


def test_lnet_stage_hands_on_its_last_epoch(ray_session, sample_store, runs_dir, make_config) -> None:
    """A real run of the auxiliary stage ``lnet`` (3 epochs of 1 step, 2 checkpoints kept): the
    segmenter its val mIoU scores is frozen, so every epoch ties exactly; the handed-on checkpoint
    is epoch 3's (Ray keeps epochs 2 and 3; taking the first of the tie handed on epoch 2)."""
    from raysemiseg.train.checkpoint import read_meta
    from raysemiseg.train.driver import train

    cfg = load_config(make_config(sample_store, runs_dir, "lnet-aux",
                                  method={"name": "lnet", "stage": "lnet", "params": {"head_hidden": 16, "head_dilation": 2}},
                                  optim={"epochs": 3, "steps_per_epoch": 1, "lr": 0.01}))
    res = train(cfg)
    vals = {round(float(h["val_miou"]), 12) for h in res.history}
    assert len(vals) == 1, f"the frozen segmenter's val mIoU moved: {vals}"
    assert res.checkpoint_rule == "latest" and res.checkpoint == res.latest_checkpoint
    assert read_meta(res.checkpoint)["epoch"] == 3
    assert read_meta(res.best_checkpoint)["epoch"] == 3  # ties go to the later checkpoint


@pytest.mark.parametrize("select,stage,rule", [("latest", "segment", "latest"), ("best", "lnet", "best"),
                                                ("auto", "lnet", "latest")])
def test_run_checkpoint_select_overrides_the_aux_stage_rule(select: str, stage: str, rule: str) -> None:
    """``run.checkpoint_select``: experiments that report on val hand on the latest checkpoint (the
    per-epoch validation scores the val split, so picking the best epoch on it would tune to val)."""
    cfg = load_config({"data": {"store": "unused"}, "method": {"name": "lnet", "stage": stage},
                       "run": {"checkpoint_select": select}})
    assert checkpoint_rule(cfg) == rule
