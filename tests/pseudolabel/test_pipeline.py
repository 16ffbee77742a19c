"""Pseudo-label pipeline on Ray Data: Bbox recipes end to end, quarantine, kill-and-rerun, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysemiseg.data.schema import IMAGE_STORE_SCHEMA, decode_mask, encode_image, encode_mask
from raysemiseg.data.store import open_store, space_to_manifest
from raysemiseg.labels import builtin
from raysemiseg.pseudolabel.bbox import bbox_rect
from raysemiseg.pseudolabel.pipeline import FAULT_ENV, load_recipe, run_pipeline
from raysemiseg.pseudolabel.store import committed_shards, open_label_store

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "pseudolabel"


def _rows(path: Path) -> dict[str, tuple[bytes, str]]:
    t = open_label_store(path).read_table(["image_id", "recipe", "mask"])
    return {i: (m, r) for i, r, m in zip(*(t.column(c).to_pylist() for c in ("image_id", "recipe", "mask")))}


@pytest.mark.parametrize("recipe_name", ["bbox_rect", "bbox_seg"])
def test_bbox_recipes_end_to_end(sample_store: Path, tmp_path: Path, recipe_name: str) -> None:
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml", {"max_rows": 12, "rows_per_shard": 5})
    res = run_pipeline(recipe, sample_store, tmp_path / "labels", progress=False)
    assert (res.rows_in, res.written + res.quarantined, res.shards_total) == (12, 12, 3)
    ls = open_label_store(tmp_path / "labels")
    assert ls.complete and ls.manifest["counts"] == {"in": 12, "written": res.written, "quarantined": res.quarantined}
    img = open_store(sample_store).read_table(["image_id", "labels", "boxes", "height", "width"]).slice(0, 12).to_pylist()
    t = ls.read_table().to_pylist()
    assert [r["image_id"] for r in t] == [r["image_id"] for r in img if r["image_id"] in {x["image_id"] for x in t}]
    by_id = {r["image_id"]: r for r in img}
    for row in t:
        src = by_id[row["image_id"]]
        mask = decode_mask(row["mask"])
        assert mask.shape == (src["height"], src["width"]) and row["recipe"] == recipe_name
        assert set(np.unique(mask)) <= {0, *src["labels"]}
        if recipe_name == "bbox_rect":
            np.testing.assert_array_equal(mask, bbox_rect(src["boxes"], src["height"], src["width"]))
            assert row["confidence"] is None
        else:
            assert row["confidence"] is not None
        prov = json.loads(row["provenance"])
        assert prov["recipe"] == recipe_name and prov["package_version"] and prov["stages"][0]["name"] == recipe_name
        assert recipe_name in json.loads(row["timings"])
    assert ls.manifest["timings"]["mean_seconds_per_image"][recipe_name] > 0
    # a rerun skips every shard and changes nothing
    again = run_pipeline(recipe, sample_store, tmp_path / "labels", progress=False)
    assert (again.shards_run, again.shards_skipped, again.written) == (0, 3, res.written)


def _tiny_store(root: Path) -> Path:
    """4 synthetic rows: good, corrupt image bytes, labels without boxes, good (VOC-21)."""
    space = builtin("voc21")
    img = np.zeros((20, 30, 3), np.uint8)
    img[5:15, 10:20] = 200
    box = [{"class_id": 8, "x0": 10.0, "y0": 5.0, "x1": 20.0, "y1": 15.0}]
    gt = np.zeros((20, 30), np.int64)
    gt[5:15, 10:20] = 8
    good = dict(source="synthetic", split="train", supervision="box", image=encode_image(img, "png"),
                image_format="png", mask=encode_mask(gt), labels=[8], boxes=box, height=20, width=30)
    rows = [dict(good, image_id="a"), dict(good, image_id="b-corrupt", image=b"\x89PNG broken"),
            dict(good, image_id="c-nobox", boxes=[]), dict(good, image_id="d")]
    (root / "images").mkdir(parents=True)
    (root / "quarantine").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_STORE_SCHEMA), root / "images" / "part-00000.parquet")
    (root / "store.json").write_text(json.dumps({"schema_version": 1, "label_space": space_to_manifest(space),
                                                 "sources": [], "counts": {"read": 4, "written": 4, "quarantined": 0}}))
    return root


def test_quarantine_rows_in_equals_out_plus_quarantined(ray_session, tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "store")
    recipe = load_recipe(RECIPES / "bbox_rect.yaml", {"rows_per_shard": 3})
    res = run_pipeline(recipe, store, tmp_path / "labels", progress=False)
    assert (res.rows_in, res.written, res.quarantined) == (4, 2, 2)
    ls = open_label_store(tmp_path / "labels")
    q = {r["image_id"]: r for r in ls.read_quarantine().to_pylist()}
    assert set(q) == {"b-corrupt", "c-nobox"}
    assert q["b-corrupt"]["stage"] == "pseudolabel:decode" and q["b-corrupt"]["reason"]
    assert q["c-nobox"]["stage"] == "pseudolabel:bbox_rect" and "no boxes" in q["c-nobox"]["reason"]
    assert sorted(_rows(tmp_path / "labels")) == ["a", "d"]
    assert ls.manifest["counts"] == {"in": 4, "written": 2, "quarantined": 2}
    # the report scores the labelled rows against the store's masks (exact boxes -> perfect IoU)
    from raysemiseg.pseudolabel.report import quality_report

    rep = quality_report([tmp_path / "labels"], store, tmp_path / "report", num_overlays=2)
    assert rep[0].scored == 2 and rep[0].metrics.miou == pytest.approx(1.0)
    assert (tmp_path / "report" / "bbox_rect_overlays.png").is_file()


def test_killed_run_then_rerun_matches_uninterrupted(sample_store: Path, tmp_path: Path) -> None:
    args = ["--max-rows", "18", "--rows-per-shard", "6", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env[FAULT_ENV] = "1"
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "raysemiseg.cli", "pseudolabel", str(RECIPES / "bbox_seg.yaml"),
           "--store", str(sample_store), "--out", str(killed), "--num-cpus", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]          # SIGKILLed right after the first commit
    assert len(committed_shards(killed)) == 1
    (killed / "shards" / ".shard-00001.parquet.tmp").write_bytes(b"partial write")   # a torn write
    recipe = load_recipe(RECIPES / "bbox_seg.yaml", {"max_rows": 18, "rows_per_shard": 6})
    resumed = run_pipeline(recipe, sample_store, killed, progress=False)
    assert (resumed.shards_run, resumed.shards_skipped) == (2, 1)
    assert not list((killed / "shards").glob(".*.tmp"))
    full = run_pipeline(recipe, sample_store, tmp_path / "full", progress=False)
    assert (full.rows_in, full.written + full.quarantined, full.shards_run) == (18, 18, 3)
    a, b = _rows(killed), _rows(tmp_path / "full")
    assert len(a) + resumed.quarantined == 18 and list(a) == list(b)       # same rows, same order, no dups
    assert all(a[k] == b[k] for k in a)                                     # identical masks
    assert open_label_store(killed).complete


def _tiny_checkpoint(root: Path, method: str) -> Path:
    import torch

    from raysemiseg.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    params = {"head_hidden": 16} if method == "strong_only" else {}
    cfg = TrainConfig(data=DataConfig(store=str(root)), model=ModelConfig(backbone="tiny", pretrained=False),
                      method=MethodConfig(name=method, params=params))
    m = get_method(method)(builtin("voc21"), cfg.model, cfg.method.build_params())
    return save_checkpoint(root / method, m, cfg, builtin("voc21"))


@pytest.mark.parametrize("recipe_name,method,execution", [
    ("cam_diffusion_crf", "cam_classifier", "auto"), ("em_adapt_crf", "strong_only", "auto"),
    ("em_fixed", "strong_only", "staged")])     # staged: the model in its own actor pool, as on GPU clusters
def test_model_recipes_end_to_end(sample_store: Path, tmp_path: Path, recipe_name: str, method: str,
                                  execution: str) -> None:
    ckpt = _tiny_checkpoint(tmp_path, method)
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml", {"max_rows": 4, "rows_per_shard": 2, "execution": execution})
    res = run_pipeline(recipe, sample_store, tmp_path / "labels", checkpoint=str(ckpt), progress=False)
    assert (res.rows_in, res.written, res.quarantined) == (4, 4, 0)
    img = {r["image_id"]: r for r in open_store(sample_store).read_table(["image_id", "labels", "height", "width"]).to_pylist()}
    for row in open_label_store(tmp_path / "labels").read_table().to_pylist():
        src = img[row["image_id"]]
        mask = decode_mask(row["mask"])
        assert mask.shape == (src["height"], src["width"]) and set(np.unique(mask)) <= {0, *src["labels"]}
        prov = json.loads(row["provenance"])
        assert prov["checkpoint_sha256"] and len(prov["checkpoint_sha256"]) == 64
        assert {s["name"] for s in prov["stages"]} <= set(json.loads(row["timings"]))
    with pytest.raises(ValueError, match="--checkpoint"):
        run_pipeline(recipe, sample_store, tmp_path / "nockpt", progress=False)


def test_task_unit_smaller_than_shard_gives_the_uninterrupted_rows(sample_store: Path, tmp_path: Path) -> None:
    """rows_per_shard > rows per task: a shard's rows arrive in several Ray Data blocks (tasks) and are
    committed once all arrived; the store equals a run with one block per shard, row for row, and the
    chain execution (one task does everything) equals the staged one (read, then CPU-stage tasks)."""
    from raysemiseg.pseudolabel.pipeline import auto_rows_per_task, plan_shards, task_items

    one = load_recipe(RECIPES / "bbox_rect.yaml", {"max_rows": 12, "rows_per_shard": 6, "rows_per_task": 6,
                                                   "execution": "staged"})
    many = load_recipe(RECIPES / "bbox_rect.yaml", {"max_rows": 12, "rows_per_shard": 6, "batch_size": 1,
                                                    "rows_per_task": 2, "execution": "chain"})
    # neither the task unit nor the execution path is part of the output's identity
    assert one.digest() == many.digest()
    plan = plan_shards(open_store(sample_store), many)
    items = task_items(plan, [0, 1], 2)
    assert [it["shard"] for it in items] == [0, 0, 0, 1, 1, 1]            # 3 blocks per shard, never across
    assert [r for it in items[:3] for r in zip(it["file_idx"], it["row_idx"])] == plan.shards[0]
    # auto: ~4 blocks per CPU, a multiple of batch_size, within [batch_size, rows_per_shard]
    assert auto_rows_per_task(load_recipe(RECIPES / "bbox_rect.yaml", {"rows_per_shard": 32, "batch_size": 1}), 96, 2) == 12
    assert auto_rows_per_task(load_recipe(RECIPES / "bbox_rect.yaml", {"rows_per_shard": 32, "batch_size": 4}), 96, 2) == 12
    assert auto_rows_per_task(load_recipe(RECIPES / "bbox_rect.yaml", {"rows_per_shard": 8, "batch_size": 4}), 96, 2) == 8
    assert auto_rows_per_task(load_recipe(RECIPES / "bbox_rect.yaml", {"rows_per_shard": 32, "batch_size": 4}), 5, 2) == 4
    a = run_pipeline(one, sample_store, tmp_path / "one", progress=False)
    b = run_pipeline(many, sample_store, tmp_path / "many", progress=False)
    assert (a.rows_in, a.shards_total, a.written + a.quarantined) == (12, 2, 12)
    assert (b.rows_in, b.shards_total, b.written + b.quarantined) == (12, 2, 12)
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "many")
    assert list(ra) == list(rb) and all(ra[k] == rb[k] for k in ra)
    t = pq.read_table(sorted((tmp_path / "many" / "shards").glob("shard-*.parquet"))[0], columns=["image_id"])
    assert t.column("image_id").to_pylist() == plan.image_ids[0]          # store order inside the shard
