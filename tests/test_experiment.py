"""Experiments (raysemiseg/experiment.py): placeholders, overrides, the side-by-side table, C3S class
groups, and a real end-to-end run (split -> Bbox-Rect store -> two arms, one a two-stage chain ->
comparison + MLflow parent/child runs) on the bundled sample with a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysemiseg.eval.metrics import ConfusionMatrix
from raysemiseg.config import dotted
from raysemiseg.experiment import (ExperimentConfig, SplitDef, class_groups, format_comparison,
                                   run_experiment, substitute)
from raysemiseg.labels import LabelSpace, builtin


def test_substitute_fills_nested_placeholders_and_names_unknown_ones() -> None:
    env = {"store": "/s", "labels.bbox": "/l", "prev": "/c"}
    got = substitute({"a": "{store}/x", "b": ["{labels.bbox}", 3], "c": {"d": "{prev}"}}, env)
    assert got == {"a": "/s/x", "b": ["/l", 3], "c": {"d": "/c"}}
    with pytest.raises(KeyError, match=r"\{labels.cam\}.*known"):
        substitute("{labels.cam}", env)


def test_dotted_merges_nested_and_dotted_keys() -> None:
    assert dotted({"optim": {"lr": 0.1, "epochs": 2}, "run.seed": 3, "scaling": {"resources_per_worker": {}}}) == {
        "optim.lr": 0.1, "optim.epochs": 2, "run.seed": 3, "scaling.resources_per_worker": {}}


def test_format_comparison_hand_checked() -> None:
    space = LabelSpace("t3", ("background", "cat", "dog"), np.zeros((3, 3), np.uint8))
    gt = torch.tensor([0, 0, 1, 1, 2, 2])
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(torch.tensor([0, 0, 1, 1, 2, 2]), gt)        # perfect: IoU 1, 1, 1
    b.update(torch.tensor([0, 1, 1, 0, 2, 0]), gt)        # bg: 1/(2+... ) ; see below
    ma, mb = a.compute(), b.compute()
    # b: background tp 1, fp 2 (pred 0 at idx 3, 5), fn 1 -> 1/4; cat tp 1, fp 1, fn 1 -> 1/3; dog tp 1, fn 1 -> 1/2
    assert mb.iou == pytest.approx([0.25, 1 / 3, 0.5])
    t = format_comparison({"A": ma, "B": mb}, space, {"strong classes": [1], "weak classes": [2]})
    rows = {ln.split()[0] if not ln.startswith("mIoU") else ln.rsplit(None, 2)[0]: ln for ln in t.splitlines()}
    assert rows["cat"].split()[1:] == ["S", "100.00", "33.33"]
    assert rows["dog"].split()[1:] == ["W", "100.00", "50.00"]
    assert rows["mIoU"].split()[-2:] == ["100.00", f"{100 * (0.25 + 1 / 3 + 0.5) / 3:.2f}"]
    assert rows["mIoU weak classes"].split()[-1] == "50.00"


def test_class_groups_c3s_only() -> None:
    space = builtin("voc21")
    assert class_groups(None, space) == {}
    assert class_groups(SplitDef(kind="i3s-fraction", fraction=0.5), space) == {}
    g = class_groups(SplitDef(kind="c3s", split_set=1), space)
    assert len(g["strong classes"]) + len(g["weak classes"]) == 20 and 0 not in g["strong classes"] + g["weak classes"]


def test_experiment_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        ExperimentConfig.model_validate({"name": "x", "workdir": "w", "store": {"path": "s"}, "base": {},
                                         "arms": [{"name": "a", "steps": [{"name": "s"}]}]})
    with pytest.raises(ValueError, match="no training step"):
        ExperimentConfig.model_validate({"name": "x", "workdir": "w", "store": {"path": "s"}, "base": {},
                                         "arms": [{"name": "a", "steps": [{"name": "l", "labels": {
                                             "name": "b", "recipe": "r.yaml"}}]}]})


def test_given_labels_column_needs_a_label_conditioned_method(tmp_path) -> None:
    from raysemiseg.experiment import plan_experiment

    cfg = ExperimentConfig.model_validate({
        "name": "x", "workdir": str(tmp_path), "store": {"path": str(tmp_path / "s")}, "base": _tiny_base(tmp_path),
        "arms": [{"name": "so", "also_given_labels": True, "steps": [{"name": "t", "train": {}}]}]})
    with pytest.raises(ValueError, match="arm 'so': also_given_labels needs a label-conditioned method"):
        plan_experiment(cfg)


def _tiny_base(store: Path) -> dict:
    return {"label_space": "voc21",
            "data": {"store": str(store), "crop_size": 64, "batch_size": 4, "max_train_rows": 16, "max_val_rows": 4,
                     "val_size": 96, "shuffle_buffer": 8},
            "model": {"backbone": "tiny", "pretrained": False},
            "method": {"name": "strong_only"},
            "optim": {"epochs": 1, "steps_per_epoch": 2, "lr": 0.01},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "run": {"name": "x", "storage_path": "unused", "max_failures": 0},
            "tracking": {"enabled": True, "experiment": "exp-test"}}


def test_experiment_end_to_end_and_resume(sample_store, tmp_path, capsys) -> None:
    import mlflow

    work = tmp_path / "exp"
    cfg = ExperimentConfig.model_validate({
        "name": "t", "workdir": str(work), "label_space": "voc21",
        "store": {"path": str(sample_store), "build_from_sample": False},
        "split": {"kind": "i3s-fraction", "fraction": 0.25, "seed": 0},
        "labels": [{"name": "bbox", "recipe": "configs/pseudolabel/bbox_rect.yaml",
                    "set": {"splits": ["train"], "max_rows": 24, "rows_per_shard": 12}}],
        "base": _tiny_base(sample_store),
        "set": {"optim": {"steps_per_epoch": 2}},
        "arms": [   # two arms (each Ray Train run costs the suite ~15 s): a label-store arm, a two-stage chain
            {"name": "dual-branch", "steps": [{"name": "train", "train": {
                "data": {"label_store": "{labels.bbox}", "strong_fraction": 0.5, "augment_in": "worker"},
                "method": {"name": "dual_branch", "params": {"neck_depth": 1, "neck_channels": 16,
                                                             "optimizer": "sgd"}}}}]},
            {"name": "decoupled", "also_given_labels": True, "steps": [
                {"name": "classify", "train": {"method": {"name": "decoupled", "stage": "classify",
                                                          "params": {"width": 16, "fc_width": 16, "bridge_width": 16}}}},
                {"name": "segment", "train": {"method": {"name": "decoupled", "stage": "segment",
                                                         "params": {"width": 16, "fc_width": 16, "bridge_width": 16,
                                                                    "init_from": "{prev}"}}}}]},
        ],
        "eval_max_rows": 6, "num_overlays": 2, "compare_untrained": True,
    })
    res = run_experiment(cfg)
    assert [a.name for a in res.arms] == ["dual-branch", "decoupled", "decoupled-GT"]
    # the -GT column scores the same checkpoint, predicting with the given image labels
    assert res.arms[2].checkpoint == res.arms[1].checkpoint
    assert res.arms[2].eval.num_images == res.arms[1].eval.num_images
    # the chain: segment started from classify's checkpoint, and that is what the arm's run recorded
    seg_cfg = (Path(res.arms[1].steps["segment"]) / "config.yaml").read_text()
    assert res.arms[1].steps["classify"] in seg_cfg
    # the label store holds exactly the selected rows, and the dual-branch run read it
    man = json.loads((work / "labels" / "bbox" / "manifest.json").read_text())
    assert man["counts"]["in"] == man["counts"]["written"] + man["counts"]["quarantined"] == 24
    dual_cfg = (Path(res.arms[0].checkpoint) / "config.yaml").read_text()
    assert str(work / "labels" / "bbox") in dual_cfg and str(work / "split.parquet") in dual_cfg
    assert "augment_in: worker" in dual_cfg        # its rows decoded and augmented in the Train worker
    summary = json.loads((work / "results.json").read_text())
    assert [a["miou"] for a in summary["arms"]] == pytest.approx([a.eval.metrics.miou for a in res.arms])
    for col in ("dual-branch", "decoupled", "decoupled-GT", "dual-branch untrained head"):
        assert col in res.table
    assert (work / "iou_comparison.png").stat().st_size > 0
    # MLflow: one parent experiment run, a child per training step (3), nested under it
    client = mlflow.MlflowClient(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("exp-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("raysemiseg.kind") == "experiment"]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in kids) == ["t-decoupled-classify", "t-decoupled-segment",
                                                      "t-dual-branch-train"]
    assert parents[0].data.metrics["dual-branch/miou"] == pytest.approx(res.arms[0].eval.metrics.miou)
    # rerun: every step is skipped, same checkpoints, and the finished label shards are kept (same
    # files: inode and mtime unchanged), not deleted and regenerated
    def shard_files() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in (work / "labels" / "bbox" / "shards").glob("shard-*.parquet")}

    before = shard_files()
    assert len(before) == 2
    capsys.readouterr()
    res2 = run_experiment(cfg)
    assert [a.checkpoint for a in res2.arms] == [a.checkpoint for a in res.arms]
    assert shard_files() == before
    out2 = capsys.readouterr().out
    assert out2.count(": done earlier (") == 3 and "shards 0 run, 2 done earlier" in out2
    # a finished step whose config changed is not silently reused
    changed = cfg.model_copy(update={"set": {"optim": {"steps_per_epoch": 2, "lr": 0.02}}})
    with pytest.raises(ValueError, match="t-dual-branch-train: its config changed"):
        run_experiment(changed)


@pytest.mark.parametrize("path", ["configs/quickstart.yaml", "configs/experiments/semi_i3s.yaml",
                                  "configs/experiments/c3s_split1.yaml", "configs/experiments/c3s_split2.yaml",
                                  "configs/experiments/c3s_split3.yaml", "configs/experiments/c3s_split4.yaml",
                                  *sorted(str(p) for p in Path("configs/experiments").glob("*_voc.yaml"))])
def test_shipped_experiments_resolve_every_step(path) -> None:
    """Every step of the shipped experiments validates (method params, recipes, placeholders in order)."""
    from raysemiseg.experiment import load_experiment, plan_experiment

    ecfg = load_experiment(path)
    plan = plan_experiment(ecfg)
    trains = [item for _, _, item in plan if hasattr(item, "method")]
    assert len(trains) == sum(1 for a in ecfg.arms for s in a.steps if s.train is not None)
    assert {t.label_space for t in trains} == {ecfg.label_space}
    # the final training step of every arm has the same step budget
    last = {arm: item for arm, _, item in plan if hasattr(item, "method")}
    assert len({t.optim.epochs * t.optim.steps_per_epoch for t in last.values()}) == 1


@pytest.mark.parametrize("path", ["configs/experiments/semi_i3s.yaml", "configs/experiments/dual_branch_table1_voc.yaml"])
def test_single_branch_mixed_is_plain_bundling_and_dual_branch_is_half_and_half(path) -> None:
    """Luo & Yang 2020 Table 1: "single-branch mixed" bundles strong and weak rows as they come
    (no strong oversampling: ``strong_fraction`` null, so a 25 % strong split gives ~2 strong
    crops of 8), while the dual-branch network draws half-strong/half-weak batches (Sec. 3.3) and
    its weak branch also trains on the strong rows (the "strong + weak" weak-branch data)."""
    from raysemiseg.experiment import load_experiment, plan_experiment

    plan = plan_experiment(load_experiment(path))
    by_arm = {arm: item for arm, _, item in plan if hasattr(item, "method")}
    assert by_arm["single-branch-mixed"].method.name == "single_branch_mixed"
    assert by_arm["single-branch-mixed"].data.strong_fraction is None
    assert by_arm["dual-branch"].data.strong_fraction == 0.5
    assert by_arm["dual-branch"].method.build_params().weak_branch_rows == "all"


def test_extends_merges_and_placeholder_order_is_checked(tmp_path) -> None:
    from raysemiseg.experiment import load_experiment, plan_experiment

    e4 = load_experiment("configs/experiments/c3s_split4.yaml")
    e1 = load_experiment("configs/experiments/c3s_split1.yaml")
    assert (e4.split.split_set, e4.split.kind, e4.label_space) == (4, "c3s", "coco80")
    assert [a.name for a in e4.arms] == [a.name for a in e1.arms]
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(Path("configs/experiments/c3s_split1.yaml").resolve()) + "\n"
                   "arms:\n  - name: a\n    steps:\n      - {name: s, train: {method: {name: lnet, params: "
                   "{init_from: '{step.later}'}}}}\n")
    with pytest.raises(KeyError, match="arm 'a', step 's'.*step.later"):
        plan_experiment(load_experiment(bad))
