"""The one metric: hand-checked confusion matrix / IoU, and 1-process == 2 gloo processes."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysemiseg.eval.metrics import ConfusionMatrix, compute_metrics, format_iou_table, miou_over
from raysemiseg.labels import LabelSpace

# (target, pred) pairs, hand-checked:
#   counted pairs (t, p): (0,0) (0,1) (1,1) (1,1) (2,0); the (255, 2) pixel is ignored.
#   C = [[1,1,0,0],[0,2,0,0],[1,0,0,0],[0,0,0,0]]
#   class 0: TP 1, GT 2, pred 2 -> IoU 1/(2+2-1) = 1/3
#   class 1: TP 2, GT 2, pred 3 -> IoU 2/3
#   class 2: TP 0, GT 1, pred 0 -> IoU 0
#   class 3: absent from both -> NaN, excluded: mIoU = (1/3 + 2/3 + 0) / 3 = 1/3
#   pixel acc 3/5; per-class acc 1/2, 1, 0 -> mean acc 1/2
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(PRED, TARGET)
    m = cm.compute()
    np.testing.assert_array_equal(m.confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(m.iou[:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(m.iou[3])
    assert m.miou == pytest.approx(1 / 3)
    assert m.pixel_acc == pytest.approx(3 / 5)
    assert m.mean_acc == pytest.approx(0.5)
    assert math.isnan(m.acc[3])
    # subset mIoU (C3S strong vs weak classes); excluded class 3 does not count
    assert miou_over(m, [0, 1]) == pytest.approx(0.5)
    assert m.miou_over([2, 3]) == pytest.approx(0.0)
    assert math.isnan(miou_over(m, [3]))
    with pytest.raises(ValueError, match="outside"):
        miou_over(m, [4])


def test_class_only_predicted_counts_as_zero() -> None:
    # class 2 never in ground truth but predicted once: IoU 0, included in the mean (VOC protocol)
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    m = cm.compute()
    np.testing.assert_allclose(m.iou, [1.0, 0.5, 0.0])
    assert m.miou == pytest.approx(0.5)
    assert m.mean_acc == pytest.approx((1.0 + 0.5) / 2)


def test_accumulates_over_updates_and_validates() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED[:1], TARGET[:1])
    cm.update(PRED[1:], TARGET[1:])
    assert cm.compute().miou == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="outside 0..3"):
        cm.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="pred has ids"):
        cm.update(torch.tensor([9]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(300, ignore_index=255)
    cm.reduce_from_all_processes()  # no process group: no-op
    with pytest.raises(RuntimeError, match="already reduced"):
        cm.reduce_from_all_processes()
    cm.reset()
    assert cm.compute().confusion.sum() == 0


def test_format_iou_table() -> None:
    space = LabelSpace("toy", ("background", "cat", "dog", "bird"), np.zeros((4, 3), np.uint8))
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    m = cm.compute()
    text = format_iou_table(m, space, title="val")
    lines = text.splitlines()
    assert lines[0] == "val"
    assert any(l.split()[:3] == ["1", "cat", "66.67"] for l in lines)
    assert any(l.split()[:3] == ["3", "bird", "-"] for l in lines)
    assert "33.33" in [l for l in lines if l.startswith("mIoU")][0]
    sub = format_iou_table(m, space, classes=[0, 1])
    assert "dog" not in sub and "50.00" in [l for l in sub.splitlines() if l.startswith("mIoU (listed)")][0]
    with pytest.raises(ValueError, match="3 classes"):
        format_iou_table(m, LabelSpace("three", ("a", "b", "c"), np.zeros((3, 3), np.uint8), background=None))


def _data(seed: int = 0, n: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (n, 17, 13), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=k - 1), torch.randint(0, k, target.shape, generator=g))
    return pred, target


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pred, target = _data()
        cm = ConfusionMatrix(5)
        cm.update(pred[rank::world], target[rank::world])  # each rank sees half the images
        cm.reduce_from_all_processes()
        np.save(Path(out_dir) / f"rank{rank}.npy", cm.compute().confusion)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    pred, target = _data()
    single = ConfusionMatrix(5)
    single.update(pred, target)
    expected = single.compute()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        conf = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_array_equal(conf, expected.confusion)
        m = compute_metrics(conf)
        assert m.miou == expected.miou
        np.testing.assert_array_equal(m.iou, expected.iou)
    assert expected.confusion.sum() == int((target != 255).sum())
