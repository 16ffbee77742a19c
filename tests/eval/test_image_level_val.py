"""Validation without pixel masks (the ImageNet-21k case): checkpoints are scored by image-level F1
(``val_score``), never a NaN mIoU; at large K no per-class metric keys, one per-class table (CSV in
the checkpoint, an MLflow artifact) instead."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from raysemiseg.config import ModelConfig
from raysemiseg.data.schema import encode_image, encode_mask
from raysemiseg.eval.predict import evaluate_rows
from raysemiseg.labels import LabelSpace, builtin
from raysemiseg.methods import get_method
from raysemiseg.train.driver import select_checkpoint
from raysemiseg.train.loop import PER_CLASS_KEYS_MAX, PER_CLASS_TABLE, epoch_metrics, evaluate, per_class_table

MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
K21K = 21_841
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _space21k() -> LabelSpace:
    names = ("background",) + tuple(f"c{i:05d}" for i in range(1, K21K))
    return LabelSpace("in21k", names, np.zeros((K21K, 3), np.uint8), ignore_index=65535)


def _constant_cam(space: LabelSpace, positive: list[int]) -> torch.nn.Module:
    """A CAM classifier whose every image and pixel scores +1 for ``positive`` classes, -1 for the
    rest (zero weights, biases set): it predicts exactly ``positive`` present in every image."""
    m = get_method("cam_classifier")(space, MODEL)
    torch.nn.init.zeros_(m.classifier.weight)
    with torch.no_grad():
        m.classifier.bias.fill_(-1.0)
        m.classifier.bias[m.rows_of(positive)] = 1.0
    return m.eval()


def _rows(labels: list[list[int]], masks: list[np.ndarray | None] | None = None) -> pa.Table:
    rng = np.random.default_rng(0)
    n = len(labels)
    imgs = [encode_image(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "png") for _ in range(n)]
    enc = [None if mk is None else encode_mask(mk) for mk in (masks or [None] * n)]
    return pa.table({"image_id": [f"i{j}" for j in range(n)], "image": imgs, "mask": pa.array(enc, pa.binary()),
                     "labels": pa.array(labels, pa.list_(pa.int32()))})


def test_image_level_only_validation_scores_by_f1_at_21841_classes(tmp_path: Path) -> None:
    space = _space21k()
    m = _constant_cam(space, [7, 21_840])
    # predicted present in every image: {7, 21840}. Truth: a {7}, b {21840, 9}, c {9}
    #   class 7: tp 1, gt 1, pred 3; class 21840: tp 1, gt 1, pred 3; class 9: tp 0, gt 2, pred 0
    #   micro F1 = 2 * 2 / (4 + 6) = 0.4; precision 2/6, recall 2/4
    #   per-class F1: 7 -> 2/4, 21840 -> 2/4, 9 -> 0: macro 1/3
    rows = _rows([[7], [21_840, 9], [9]])
    val = evaluate(m, rows, space.num_classes, space.ignore_index, torch.device("cpu"), mean=MEAN, std=STD)
    assert val.mask_images == 0 and val.seg.num_pixels == 0 and math.isnan(val.seg.miou)
    assert val.labels.num_images == 3
    assert val.labels.micro_f1 == pytest.approx(0.4)
    assert val.score == pytest.approx(0.4)
    out = epoch_metrics(val, space)
    assert out["val_score"] == pytest.approx(0.4) and out["val_f1"] == pytest.approx(0.4)
    assert out["val_precision"] == pytest.approx(1 / 3) and out["val_recall"] == pytest.approx(0.5)
    assert out["val_macro_f1"] == pytest.approx(1 / 3)
    assert math.isnan(out["val_miou"])
    assert out["val_mask_images"] == 0 and out["val_label_images"] == 3
    assert space.num_classes > PER_CLASS_KEYS_MAX and not [k for k in out if "/" in k]  # scalars only
    assert len(out) == 10
    table = list(csv.DictReader(io.StringIO(per_class_table(val, space))))
    assert [int(r["class_id"]) for r in table] == [7, 9, 21_840]          # classes with any count only
    r7 = table[0]
    assert r7["class"] == "c00007" and (r7["tp_images"], r7["gt_images"], r7["pred_images"]) == ("1", "1", "3")
    assert float(r7["f1"]) == pytest.approx(0.5) and r7["iou"] == "" and r7["gt_pixels"] == "0"
    # the shared CLI evaluator scores the same rows by the same F1 (no mask: no mIoU images)
    res = evaluate_rows(m, rows, space, progress=False)
    assert res.num_images == 0 and res.labels is not None and res.labels.micro_f1 == pytest.approx(0.4)


def test_rows_with_masks_keep_miou_as_the_score() -> None:
    space = builtin("voc21")
    m = _constant_cam(space, [15])   # every pixel and image: person (15)
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 15
    # class 15: tp 1536, gt 1536, pred 3072 -> IoU 1/2; background: gt 1536, pred 0 -> IoU 0; mIoU 1/4
    rows = _rows([[15], [3]], [mask, None])
    val = evaluate(m, rows, space.num_classes, space.ignore_index, torch.device("cpu"), mean=MEAN, std=STD)
    assert val.mask_images == 1 and val.seg.miou == pytest.approx(0.25)
    assert val.score == pytest.approx(0.25)
    # image labels over both rows: tp 1 (row 0: 15), gt 2, pred 2 -> F1 1/2
    assert val.labels.micro_f1 == pytest.approx(0.5)
    out = epoch_metrics(val, space)
    assert out["val_score"] == pytest.approx(0.25)
    assert out["val_iou/person"] == pytest.approx(0.5) and out["val_iou/background"] == 0.0  # small K: kept


def test_select_checkpoint_by_val_score_never_by_nan() -> None:
    cands = [("a", {"val_score": 0.4, "val_miou": float("nan"), "global_step": 10}),
             ("b", {"val_score": 0.6, "val_miou": float("nan"), "global_step": 20}),
             ("c", {"val_score": 0.5, "val_miou": float("nan"), "global_step": 30})]
    assert select_checkpoint(cands) == "b"
    assert select_checkpoint([("old", {"val_miou": 0.3, "global_step": 5}),   # older reports: val_miou
                              ("new", {"val_miou": 0.2, "global_step": 6})]) == "old"


def test_per_class_table_reaches_mlflow_as_one_artifact(tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from raysemiseg.tune.tracking import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = c.create_run(exp).info.run_id
    ck = tmp_path / "ckpt"
    ck.mkdir()
    text = "class_id,class,iou\n7,c00007,0.5\n"
    (ck / PER_CLASS_TABLE).write_text(text)
    MLflowCallback(uri, run_id).after_report(None, [{"epoch": 2, "val_score": 0.4}],
                                            Checkpoint.from_directory(str(ck)))
    got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="per_class/epoch_0002.csv",
                                              tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert Path(got).read_text() == text
    assert set(c.get_run(run_id).data.metrics) == {"val_score", "epoch"}


def test_eval_shows_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    space = builtin("voc21")
    m = _constant_cam(space, [15])
    res = evaluate_rows(m, _rows([[15], [3], [15]]), space, desc="eval val", progress=True)
    err = capsys.readouterr().err
    assert "eval val" in err and "3/3" in err and "img" in err     # tqdm over the rows, total known
    assert res.labels is not None and res.labels.num_images == 3
    evaluate_rows(m, _rows([[15]]), space, desc="quiet", progress=False)
    assert "quiet" not in capsys.readouterr().err
