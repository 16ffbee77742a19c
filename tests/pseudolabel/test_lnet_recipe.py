"""L-Net map M in the pseudo-label engine (Xiao et al. 2018: F of Eq. 2 includes M).

Closed-form effect of M on self-diffusion, the ``diffusion`` stage reading M from the per-image
state, the ``lnet_map`` model stage against :func:`lnet_map`, and the
``lnet_cam_diffusion_crf`` recipe end to end on the sample store with tiny checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysemiseg.data.schema import decode_mask, encode_image
from raysemiseg.data.store import open_store
from raysemiseg.labels import builtin
from raysemiseg.pseudolabel.pipeline import (
    _Ctx, _ModelStage, _run_cpu_stage, _unpack, load_recipe, run_pipeline, run_serial,
)
from raysemiseg.pseudolabel.store import open_label_store
from raysemiseg.pseudolabel.superpixels import DiffusionParams, self_diffusion
from raysemiseg.train.checkpoint import MODEL_FILE

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "pseudolabel" / "lnet_cam_diffusion_crf.yaml"
CTX = _Ctx(background_id=0, num_classes=21)


def _tiny_checkpoint(root: Path, method: str) -> Path:
    from raysemiseg.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    params = {"head_hidden": 16} if method == "lnet" else {}
    cfg = TrainConfig(data=DataConfig(store=str(root)), model=ModelConfig(backbone="tiny", pretrained=False),
                      method=MethodConfig(name=method, params=params))
    m = get_method(method)(builtin("voc21"), cfg.model, cfg.method.build_params())
    return save_checkpoint(root / method, m, cfg, builtin("voc21"))


def test_agnostic_map_changes_diffusion_closed_form() -> None:
    """Four equal-colour 4x4 blocks, CAM 0.9, 0.3, 0.3, 0.0 (block 0 = seed, block 3 = background seed).

    Without M every z_ij = 1: q = [1, 2/3, 1/3, 0], block 2 is background. With M = [1, 1, 1, 0] and
    weight w, only z_23 = exp(-w / (2 sigma^2)) drops: a resistor chain 1, 1, 1/z_23 with
    tot = 2 + 1/z_23 gives q = [1, 1 - 1/tot, 1 - 2/tot, 0] and block 2 turns foreground.
    """
    img = np.full((4, 16, 3), 120, np.uint8)
    seg = np.repeat(np.arange(4), 4)[None].repeat(4, 0)
    cam = np.zeros((1, 4, 16), np.float32)
    agn = np.zeros((4, 16), np.float32)
    for b, (v, m) in enumerate([(0.9, 1.0), (0.3, 1.0), (0.3, 1.0), (0.0, 0.0)]):
        cam[0, :, 4 * b:4 * b + 4] = v
        agn[:, 4 * b:4 * b + 4] = m
    params = DiffusionParams(sigma=3.0, agnostic_weight=50.0, seed_threshold=0.6, bg_seed_threshold=0.1,
                             bg_threshold=0.5)
    lab0, q0 = self_diffusion(img, cam, [12], 0, params, segments=seg)
    lab1, q1 = self_diffusion(img, cam, [12], 0, params, agnostic=agn, segments=seg)
    np.testing.assert_allclose(q0[1, 0, ::4], [1.0, 2 / 3, 1 / 3, 0.0], atol=1e-4)
    tot = 2.0 + np.exp(50.0 / 18.0)
    np.testing.assert_allclose(q1[1, 0, ::4], [1.0, 1 - 1 / tot, 1 - 2 / tot, 0.0], atol=1e-4)
    assert lab0[0].tolist() == [12] * 8 + [0] * 8
    assert lab1[0].tolist() == [12] * 12 + [0] * 4
    # agnostic_weight = 0 switches M off
    lab2, q2 = self_diffusion(img, cam, [12], 0, params.model_copy(update={"agnostic_weight": 0.0}), agnostic=agn,
                              segments=seg)
    np.testing.assert_array_equal(q2, q0)


def _strip_case() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Uniform grey 32 x 128 image (SLIC gives a grid), CAM 0.9 / 0.3 / 0.3 / 0 per 32-column block."""
    img = np.full((32, 128, 3), 128, np.uint8)
    cam = np.zeros((1, 32, 128), np.float32)
    for b, v in enumerate([0.9, 0.3, 0.3, 0.0]):
        cam[0, :, 32 * b:32 * b + 32] = v
    agn = np.zeros((32, 128), np.float32)
    agn[:, :96] = 1.0
    return img, {"cams": cam, "fg_ids": np.array([12], np.int64), "agnostic": agn}


def test_diffusion_stage_uses_agnostic_state_when_present() -> None:
    img, st = _strip_case()
    params = DiffusionParams(n_segments=16, slic_scale=1.0)
    row = {"height": 32, "width": 128, "labels": [12], "boxes": []}
    with_m = dict(st)
    _run_cpu_stage("diffusion", params, row, img, with_m, CTX)
    without = {k: v for k, v in st.items() if k != "agnostic"}
    _run_cpu_stage("diffusion", params, row, img, without, CTX)
    ref, _ = self_diffusion(img, st["cams"], [12], 0, params, agnostic=st["agnostic"])
    np.testing.assert_array_equal(with_m["label"], ref)
    assert (with_m["label"] == 12).sum() > (without["label"] == 12).sum()   # M pulls blocks 1-2 to the seed
    # SLIC cells do not follow the 32-column blocks: check the extent with a cell's slack (~20 columns)
    assert (with_m["label"][:, :76] == 12).all() and (with_m["label"][:, 116:] == 0).all()
    assert (without["label"][:, :32] == 12).all() and (without["label"][:, 76:] == 0).all()


def test_lnet_map_stage_matches_lnet_map_and_rejects_other_methods(tmp_path: Path) -> None:
    from raysemiseg.methods.lpnet.model import lnet_map
    from raysemiseg.models.backbones import normalize
    from raysemiseg.train.checkpoint import load_method

    lnet = _tiny_checkpoint(tmp_path, "lnet")
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    row = {"image": encode_image(rgb, "png"), "labels": [8], "height": 24, "width": 40, "state": None,
           "timings": "{}", "q_stage": "", "q_reason": ""}
    stage = _ModelStage("lnet_map", {}, str(lnet), CTX, use_gpu=False)
    stage.run_row(row)
    assert not row["q_reason"] and "lnet_map" in json.loads(row["timings"])
    m = _unpack(row["state"])["agnostic"]
    method, _, _ = load_method(lnet)
    x = normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0, method.lnet_backbone)
    np.testing.assert_allclose(m, lnet_map(method, x)[0].numpy(), atol=1e-6)
    assert m.shape == (24, 40) and m.dtype == np.float32 and 0.0 <= m.min() <= m.max() <= 1.0
    half = _ModelStage("lnet_map", {"input_scale": 0.5}, str(lnet), CTX, use_gpu=False)
    row2 = dict(row, state=None, timings="{}")
    half.run_row(row2)
    assert _unpack(row2["state"])["agnostic"].shape == (24, 40)
    cam_ckpt = _tiny_checkpoint(tmp_path, "cam_classifier")
    with pytest.raises(ValueError, match="no L-Net"):
        _ModelStage("lnet_map", {"checkpoint": str(cam_ckpt)}, str(lnet), CTX, use_gpu=False)


def test_lnet_cam_diffusion_crf_recipe_end_to_end(sample_store: Path, tmp_path: Path) -> None:
    cam_ckpt = _tiny_checkpoint(tmp_path, "cam_classifier")
    lnet_ckpt = _tiny_checkpoint(tmp_path, "lnet")
    recipe = load_recipe(RECIPE, {"max_rows": 4, "rows_per_shard": 2})
    assert [s.name for s in recipe.stages] == ["lnet_map", "cam", "diffusion", "crf"]
    res = run_pipeline(recipe, sample_store, tmp_path / "labels", checkpoint=str(cam_ckpt), progress=False,
                       stage_checkpoints={"lnet_map": str(lnet_ckpt)})
    assert (res.rows_in, res.written, res.quarantined, res.shards_total) == (4, 4, 0, 2)
    ls = open_label_store(tmp_path / "labels")
    rows = ls.read_table().to_pylist()
    src = open_store(sample_store).read_table().slice(0, 4).to_pylist()
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in src]
    lnet_sha = hashlib.sha256((Path(lnet_ckpt) / MODEL_FILE).read_bytes()).hexdigest()
    for row, s in zip(rows, src):
        mask = decode_mask(row["mask"])
        assert mask.shape == (s["height"], s["width"]) and set(np.unique(mask)) <= {0, *s["labels"]}
        assert row["confidence"] is not None
        prov = json.loads(row["provenance"])
        assert prov["stage_checkpoints"]["lnet_map"] == {"path": str(lnet_ckpt), "sha256": lnet_sha}
        assert len(prov["checkpoint_sha256"]) == 64 and prov["checkpoint_sha256"] != lnet_sha
        assert {"lnet_map", "cam", "diffusion", "crf"} <= set(json.loads(row["timings"]))
    assert ls.manifest["timings"]["mean_seconds_per_image"]["lnet_map"] > 0
    # the actor-pool run equals the one-process reference (same stages, same checkpoints)
    serial = run_serial(recipe, src, 0, 21, checkpoint=str(cam_ckpt), stage_checkpoints={"lnet_map": str(lnet_ckpt)})
    assert [decode_mask(r["mask"]).tolist() for r in serial] == [decode_mask(r["mask"]).tolist() for r in rows]
    # a stage_checkpoints name that takes no checkpoint is a clear error
    with pytest.raises(ValueError, match="'crf'"):
        run_pipeline(recipe, sample_store, tmp_path / "bad", checkpoint=str(cam_ckpt), progress=False,
                     stage_checkpoints={"crf": str(lnet_ckpt)})
