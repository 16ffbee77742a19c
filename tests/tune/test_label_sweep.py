"""Pseudo-label sweeps (``kind: pseudolabel``): validation against the recipe before work, a trial's
score equals the quality report of the same recipe run through the Ray Data pipeline, and a tiny
real sweep over the diffusion parameters with MLflow parent/child runs and a best recipe that
``load_recipe`` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysemiseg.config import ConfigError
from raysemiseg.pseudolabel.pipeline import load_recipe
from raysemiseg.tune.sweep import grid_size, load_sweep

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "pseudolabel"


def _tiny_cam(root: Path) -> Path:
    import torch

    from raysemiseg.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from raysemiseg.labels import builtin
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = TrainConfig(data=DataConfig(store=str(root)), model=ModelConfig(backbone="tiny", pretrained=False),
                      method=MethodConfig(name="cam_classifier"))
    m = get_method("cam_classifier")(builtin("voc21"), cfg.model, cfg.method.build_params())
    run = root / "cam-run"
    save_checkpoint(run / "checkpoint_000000", m, cfg, builtin("voc21"))
    return save_checkpoint(run / "checkpoint_000001", m, cfg, builtin("voc21"))


def _write(tmp_path: Path, store: Path, name: str = "sweep.yaml", **extra) -> Path:
    sweep = {"name": "tiny_diffusion", "kind": "pseudolabel", "base": str(RECIPES / "cam_diffusion.yaml"),
             "labels": {"store": str(store), "split": "val", "max_rows": 4},
             "search_space": {"diffusion.sigma": {"grid": [1.0, 9.0]}},
             "storage_path": str(tmp_path / "sweeps"), **extra}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(sweep))
    return p


def test_label_sweep_validation_before_work(sample_store, tmp_path) -> None:
    ckpt = _tiny_cam(tmp_path)
    sweep, base = load_sweep(_write(tmp_path, sample_store), {"labels.checkpoint": str(ckpt.parent)})
    assert (sweep.kind, sweep.metric, sweep.scheduler.name, grid_size(sweep)) == ("pseudolabel", "label_miou", "fifo", 2)
    assert base["checkpoint"] == str(ckpt.resolve())          # a run folder resolves to its newest checkpoint
    with pytest.raises(ConfigError, match="no stage 'diffusio'"):
        load_sweep(_write(tmp_path, sample_store, "b1.yaml", search_space={"diffusio.sigma": {"grid": [1.0]}}))
    with pytest.raises(ConfigError, match="n_segment"):
        load_sweep(_write(tmp_path, sample_store, "b2.yaml", search_space={"diffusion.n_segment": {"grid": [9]}}))
    with pytest.raises(ConfigError, match="use scheduler"):
        load_sweep(_write(tmp_path, sample_store, "b3.yaml", scheduler={"name": "asha"}))
    with pytest.raises(FileNotFoundError, match="not an image store"):
        load_sweep(_write(tmp_path, tmp_path / "nowhere", "b4.yaml"))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_sweep(_write(tmp_path, sample_store, "b5.yaml"), {"labels.checkpoint": str(tmp_path)})


def test_trial_score_equals_quality_report_of_the_pipeline(sample_store, tmp_path) -> None:
    """One implementation scores labels: a trial (serial, in-process) and the quality report of the
    same recipe's Ray Data label store agree exactly, on the same images."""
    from raysemiseg.pseudolabel.pipeline import run_pipeline
    from raysemiseg.pseudolabel.report import quality_report
    from raysemiseg.tune.label_sweep import labelled_rows, score_trial

    sweep, base = load_sweep(_write(tmp_path, sample_store, base=str(RECIPES / "bbox_seg.yaml"), search_space={
        "bbox_seg.fg_prior": {"grid": [0.7]}}, labels={"store": str(sample_store), "split": "val", "max_rows": 6}))
    report, recipe, table = score_trial(base, {"bbox_seg.fg_prior": 0.7})
    assert report["images"] == 6 and report["quarantined"] == 0 and "mIoU" in table
    rows, _, _ = labelled_rows(base["store"], "val", 6)
    out = tmp_path / "labels"
    run_pipeline(recipe.model_copy(update={"splits": ["val"], "max_rows": 6}), sample_store, out, progress=False)
    q = quality_report([out], sample_store)[0]
    assert q.scored == 6 and q.quarantined == 0
    assert report["label_miou"] == pytest.approx(q.metrics.miou, abs=1e-12)
    assert report["label_pixel_acc"] == pytest.approx(q.metrics.pixel_acc, abs=1e-12)
    assert 0.2 < report["label_miou"] < 1.0      # Bbox-Seg on real boxes: far above chance, below perfect


def test_tiny_real_label_sweep_tracks_parent_and_children(ray_session, sample_store, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from raysemiseg.tune.sweep import run_sweep

    ckpt = _tiny_cam(tmp_path)
    result = run_sweep(_write(tmp_path, sample_store), overrides={"labels.checkpoint": str(ckpt)})
    out = capsys.readouterr().out
    assert "sweep tiny_diffusion: 2 trials" in out and "best:" in out
    assert [r["status"] for r in result.rows] == ["finished", "finished"], result.table
    assert {r["values"]["diffusion.sigma"] for r in result.rows} == {1.0, 9.0}
    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_label_miou"] == pytest.approx(result.best_metric)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2
    for child in children:
        m = child.data.metrics
        assert child.info.status == "FINISHED" and 0.0 <= m["label_miou"] <= 1.0
        assert m["images"] == 4 and m["quarantined"] == 0
        assert child.data.params["stage.diffusion.sigma"] in ("1.0", "9.0")
    best = load_recipe(result.best_config_path)
    sigma = {s.name: s.params for s in best.stages}["diffusion"]["sigma"]
    assert sigma == result.rows[0]["values"]["diffusion.sigma"]
