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
from raysemiseg.pseudolabel.pipeline import checkpoint_hash, load_recipe, run_pipeline, run_serial
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


_KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from raysemiseg.pseudolabel.pipeline import checkpoint_hash, load_recipe, run_pipeline, run_serial
recipe = load_recipe(sys.argv[1], {"max_rows": 18, "rows_per_shard": 3})
run_pipeline(recipe, sys.argv[2], sys.argv[3], num_cpus=2, progress=False,
             on_shard=lambda k: os.kill(os.getpid(), signal.SIGKILL))   # the driver dies at its first commit
"""


def test_killed_run_then_rerun_matches_uninterrupted(sample_store: Path, tmp_path: Path) -> None:
    """The driver is SIGKILLed when it learns of its first committed shard (the fault is injected
    from here, through ``on_shard``); workers write shards, so a few more may land before the local
    cluster goes down with the driver, never a torn one. The rerun commits the rest and equals an
    uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", _KILL_AFTER_FIRST_SHARD, str(RECIPES / "bbox_seg.yaml"), str(sample_store), str(killed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]          # SIGKILLed right after the first commit
    first = committed_shards(killed)
    assert 1 <= len(first) <= 6
    assert not open_label_store(killed).complete
    (killed / "shards" / ".shard-00000005.parquet.0123.tmp").write_bytes(b"partial write")   # a torn write
    recipe = load_recipe(RECIPES / "bbox_seg.yaml", {"max_rows": 18, "rows_per_shard": 3})
    resumed = run_pipeline(recipe, sample_store, killed, progress=False)
    assert (resumed.shards_run, resumed.shards_skipped) == (6 - len(first), len(first))
    assert not list((killed / "shards").glob(".*.tmp"))
    full = run_pipeline(recipe, sample_store, tmp_path / "full", progress=False)
    assert (full.rows_in, full.written + full.quarantined, full.shards_run) == (18, 18, 6)
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


def test_chain_and_staged_write_the_same_shards(sample_store: Path, tmp_path: Path) -> None:
    """Both executions run the same steps: the chain (one task per shard does everything) equals the
    staged graph (read task, then CPU-stage tasks, the last one writing), row for row; a shard is
    one Ray Data row, so each shard file holds its planned rows in store order."""
    from raysemiseg.pseudolabel.pipeline import plan_shards

    staged = load_recipe(RECIPES / "bbox_rect.yaml", {"max_rows": 12, "rows_per_shard": 5, "execution": "staged"})
    chain = load_recipe(RECIPES / "bbox_rect.yaml", {"max_rows": 12, "rows_per_shard": 5, "execution": "chain"})
    assert staged.digest() == chain.digest()       # the execution path is not part of the output's identity
    plan = plan_shards(open_store(sample_store), chain)
    assert [len(ids) for ids in plan.image_ids] == [5, 5, 2]
    items = plan.items([0, 2])
    assert [it["shard"] for it in items] == [0, 2] and items[1]["image_ids"] == plan.image_ids[2]
    a = run_pipeline(staged, sample_store, tmp_path / "staged", progress=False)
    b = run_pipeline(chain, sample_store, tmp_path / "chain", progress=False)
    assert (a.rows_in, a.shards_total, a.written + a.quarantined) == (12, 3, 12)
    assert (b.rows_in, b.shards_total, b.written + b.quarantined) == (12, 3, 12)
    ra, rb = _rows(tmp_path / "staged"), _rows(tmp_path / "chain")
    assert list(ra) == list(rb) and all(ra[k] == rb[k] for k in ra)
    names = sorted(p.name for p in (tmp_path / "chain" / "shards").glob("shard-*.parquet"))
    assert names == ["shard-00000000.parquet", "shard-00000001.parquet", "shard-00000002.parquet"]
    for k, name in enumerate(names):
        t = pq.read_table(tmp_path / "chain" / "shards" / name, columns=["image_id"])
        assert t.column("image_id").to_pylist() == plan.image_ids[k]     # store order inside the shard
    man = json.loads((tmp_path / "chain" / "manifest.json").read_text())
    assert "shards" not in man and man["complete"]                        # no per-shard map


# ------------------------------------------------------------------------------------------
# resume by content: the checkpoints' SHA-256 are part of the resume key
def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("shard-*.parquet")}


def _shas(out: Path) -> set[str]:
    t = open_label_store(out).read_table(["provenance"])
    return {json.loads(p)["checkpoint_sha256"] for p in t.column("provenance").to_pylist()}


def test_resume_key_holds_the_checkpoint_content(sample_store: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from raysemiseg.train.checkpoint import MODEL_FILE

    a = _tiny_checkpoint(tmp_path / "a", "cam_classifier")
    b = _tiny_checkpoint(tmp_path / "b", "cam_classifier")
    sd = torch.load(b / MODEL_FILE, weights_only=True)
    torch.save({k: v + 0.5 if v.is_floating_point() else v for k, v in sd.items()}, b / MODEL_FILE)  # other weights
    sha_a, sha_b = (checkpoint_hash(a), checkpoint_hash(b))
    assert sha_a != sha_b
    run = tmp_path / "run"                           # a training run folder: its newest checkpoint_* is used
    shutil.copytree(a, run / "checkpoint_000001")
    recipe = load_recipe(RECIPES / "cam.yaml", {"max_rows": 4, "rows_per_shard": 2})
    out = tmp_path / "labels"
    first = run_pipeline(recipe, sample_store, out, checkpoint=str(a), progress=False)
    assert (first.shards_run, first.written) == (2, 4) and _shas(out) == {sha_a}
    before = _stats(out)
    assert len(before) == 2
    # same recipe, same rows, same weights (here through the run folder): every shard is kept, with
    # or without overwrite ("replace only what differs")
    for ck, ow in ((str(run), True), (str(a), False), (str(a), True)):
        again = run_pipeline(recipe, sample_store, out, checkpoint=ck, overwrite=ow, progress=False)
        assert (again.shards_run, again.shards_skipped) == (0, 2)
        assert _stats(out) == before
    # another checkpoint into the same folder: refused, naming both and --overwrite; nothing changed
    with pytest.raises(ValueError, match=rf"(?s){a}.*{sha_a[:12]}.*{b}.*{sha_b[:12]}.*--overwrite"):
        run_pipeline(recipe, sample_store, out, checkpoint=str(b), progress=False)
    assert _stats(out) == before
    # the run folder's newest checkpoint changes: also another checkpoint
    shutil.copytree(b, run / "checkpoint_000002")
    with pytest.raises(ValueError, match="checkpoint_000002"):
        run_pipeline(recipe, sample_store, out, checkpoint=str(run), progress=False)
    # a part-written store (one shard lost) and another checkpoint: refused, never mixed ...
    (out / "shards" / "shard-00000001.parquet").unlink()
    with pytest.raises(ValueError, match="--overwrite"):
        run_pipeline(recipe, sample_store, out, checkpoint=str(b), progress=False)
    # ... and with overwrite every row is relabelled by the new model
    new = run_pipeline(recipe, sample_store, out, checkpoint=str(b), overwrite=True, progress=False)
    assert (new.shards_run, new.shards_skipped, new.written) == (2, 0, 4)
    assert _shas(out) == {sha_b}
    assert open_label_store(out).manifest["resume_key"]["checkpoints"] == {"cam": sha_b}


def test_stage_checkpoints_enter_the_resume_key(tmp_path: Path) -> None:
    """Every model stage's resolved checkpoint is hashed: the L-Net map's next to the CAM one."""
    from raysemiseg.pseudolabel.pipeline import resolve_stage_checkpoints

    cam = _tiny_checkpoint(tmp_path, "cam_classifier")
    lnet_run = tmp_path / "lnet_run"
    from raysemiseg.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import save_checkpoint

    cfg = TrainConfig(data=DataConfig(store=str(tmp_path)), model=ModelConfig(backbone="tiny", pretrained=False),
                      method=MethodConfig(name="lnet", params={"head_hidden": 16}))
    m = get_method("lnet")(builtin("voc21"), cfg.model, cfg.method.build_params())
    save_checkpoint(lnet_run / "checkpoint_000003", m, cfg, builtin("voc21"))
    recipe = load_recipe(RECIPES / "lnet_cam_diffusion_crf.yaml").with_stage_checkpoints({"lnet_map": str(lnet_run)})
    got = resolve_stage_checkpoints(recipe, str(cam))
    assert set(got) == {"lnet_map", "cam"}
    assert got["lnet_map"]["path"] == str(lnet_run / "checkpoint_000003")       # the run folder, resolved
    assert got["lnet_map"]["sha256"] == checkpoint_hash(lnet_run) != got["cam"]["sha256"] == checkpoint_hash(cam)
    with pytest.raises(ValueError, match="--checkpoint"):
        resolve_stage_checkpoints(load_recipe(RECIPES / "cam.yaml"), None)


# ------------------------------------------------------------------------------------------
# runtime errors are not bad data
def _failing_scores_recipe(execution: str):
    """em_fixed whose scores stage shrinks the 20 x 30 images to 0 x 0: torch raises RuntimeError
    inside the model stage for every decodable image (a stand-in for a CUDA OOM / device error)."""
    return load_recipe(RECIPES / "em_fixed.yaml", {"rows_per_shard": 2, "execution": execution,
                                                   "stages": [{"name": "scores", "params": {"input_scale": 0.01}},
                                                              {"name": "em", "params": {"mode": "fixed", "b_fg": 5.0, "b_bg": 3.0,
                                                                                        "suppress_absent": True}}]})


def test_model_stage_runtime_error_fails_the_serial_run(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "store")
    ckpt = _tiny_checkpoint(tmp_path, "strong_only")
    rows = open_store(store).read_table().to_pylist()
    ok = run_serial(load_recipe(RECIPES / "em_fixed.yaml"), rows, 0, 21, checkpoint=str(ckpt))
    assert [r["q_stage"] for r in ok] == ["", "decode", "", ""]          # only the corrupt image is bad data
    with pytest.raises(RuntimeError, match="greater than 0"):
        run_serial(_failing_scores_recipe("chain"), rows, 0, 21, checkpoint=str(ckpt))


@pytest.mark.parametrize("execution", ["chain", "staged"])     # a task; an actor-pool model stage
def test_model_stage_runtime_error_fails_the_ray_run(ray_session, tmp_path: Path, execution: str) -> None:
    store = _tiny_store(tmp_path / "store")
    ckpt = _tiny_checkpoint(tmp_path, "strong_only")
    out = tmp_path / "labels"
    with pytest.raises(Exception, match="greater than 0") as err:
        run_pipeline(_failing_scores_recipe(execution), store, out, checkpoint=str(ckpt), progress=False)
    assert "RuntimeError" in f"{type(err.value).__mro__} {err.value}"
    ls = open_label_store(out)
    assert not ls.complete and "counts" not in ls.manifest       # never marked complete
    # no row was quarantined for it: the shards holding those rows were not committed
    assert committed_shards(out) == set() and ls.read_quarantine().num_rows == 0


# ------------------------------------------------------------------------------------------
# model stages ask for their GPUs (the plan, not a run)
def test_gpu_recipe_plan_asks_for_gpus_on_a_cluster_without_any(ray_session) -> None:
    import ray

    from raysemiseg.pseudolabel.pipeline import _Ctx, _ModelStage, _Writer, plan_ops

    assert ray.cluster_resources().get("GPU", 0) == 0           # the autoscaler has not added GPU nodes yet
    ckpts = {"cam": {"path": "/ckpt/cam", "sha256": "0" * 64}}
    ctx, w = _Ctx(0, 21), _Writer("/labels", "cam_diffusion_crf", "{}", True)
    gpu = load_recipe(RECIPES / "cam_diffusion_crf.yaml", {"gpus_per_model_actor": 1, "model_actors": [1, 4]})
    ops = plan_ops(gpu, ckpts, ctx, ["/store/part-0.parquet"], w)
    assert [o.name for o in ops] == ["read", "cam", "diffusion+crf"]
    cam = ops[1]
    assert cam.fn is _ModelStage and cam.kwargs["num_gpus"] == 1
    assert (cam.kwargs["compute"].min_size, cam.kwargs["compute"].max_size) == (1, 4)
    assert cam.kwargs["fn_constructor_kwargs"]["device"] == "auto"      # cuda iff the actor got a GPU
    assert all("num_gpus" not in o.kwargs for o in (ops[0], ops[2]))
    # Ray Data takes those arguments as they are (built lazily, not run)
    ds = ray.data.from_items([{"x": 0}])
    for o in ops:
        ds = ds.map_batches(o.fn, **o.kwargs)
    dag = ds._logical_plan.dag.input_dependencies[0]                     # the cam operator
    assert dag.ray_remote_args["num_gpus"] == 1 and (dag.compute.min_size, dag.compute.max_size) == (1, 4)
    # without GPUs asked for, model recipes run chained on CPU; asked for, the chain tasks get them
    cpu = plan_ops(load_recipe(RECIPES / "cam_diffusion_crf.yaml"), ckpts, ctx, [], w)
    assert [o.name for o in cpu] == ["chain"] and "num_gpus" not in cpu[0].kwargs
    chain_gpu = plan_ops(load_recipe(RECIPES / "cam_diffusion_crf.yaml", {"gpus_per_model_actor": 0.5,
                                                                          "execution": "chain"}), ckpts, ctx, [], w)
    assert chain_gpu[0].kwargs["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="model_actors"):
        load_recipe(RECIPES / "cam.yaml", {"model_actors": [3, 2]})


def test_shard_names_sort_past_99999(tmp_path: Path) -> None:
    from raysemiseg.pseudolabel.store import shard_index, shard_name

    names = [shard_name(k) for k in (7, 99_999, 100_000, 12_345_678)]
    assert names == sorted(names) and [shard_index(n) for n in names] == [7, 99_999, 100_000, 12_345_678]
    assert shard_index("shard-00042.parquet") == 42                      # stores written with 5 digits
