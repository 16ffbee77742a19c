"""The one metric: hand-checked per-class counts / IoU, O(K) state at K = 21,841, image-level F1,
and 1-process == 2 gloo processes."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysemiseg.eval.metrics import (ConfusionMatrix, IoUCounts, LabelCounts, compute_metrics, format_iou_table,
                                    metrics_from_counts, miou_over)
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
    # diagonal, row sums and column sums of C
    np.testing.assert_array_equal(m.tp, [1, 2, 0, 0])
    np.testing.assert_array_equal(m.gt_pixels, [2, 2, 1, 0])
    np.testing.assert_array_equal(m.pred_pixels, [2, 3, 0, 0])
    assert m.num_pixels == 5
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
    # the dense-matrix entry point agrees with the counts
    dense = compute_metrics(np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(dense.iou, m.iou)
    assert dense.miou == m.miou and dense.pixel_acc == m.pixel_acc
    assert ConfusionMatrix is IoUCounts  # the former name, kept for callers


def test_state_is_o_k_at_21841_classes() -> None:
    # ImageNet-21k: the old dense K x K int64 matrix was 21,841^2 * 8 B = 3.8 GB (and a second one
    # per update from bincount(minlength=K*K)); the counts are 3 * K int64 = 0.5 MB.
    k = 21_841
    cm = IoUCounts(k, ignore_index=k + 100)
    # hand-checked: classes 7 and 21,840 (the last id) in a 2x3 image, one void pixel
    #   (t, p): (7,7) (7,7) (7,21840) (21840,21840) (21840,7) (void, 3)
    #   class 7:     tp 2, gt 3, pred 3 -> IoU 2 / (3 + 3 - 2) = 1/2
    #   class 21840: tp 1, gt 2, pred 2 -> IoU 1 / (2 + 2 - 1) = 1/3
    #   every other class absent from both -> excluded: mIoU = (1/2 + 1/3) / 2 = 5/12
    target = torch.tensor([[7, 7, 7], [21_840, 21_840, k + 100]])
    pred = torch.tensor([[7, 7, 21_840], [21_840, 7, 3]])
    cm.update(pred, target)
    cm.update(pred[:, :0], target[:, :0])  # an empty update adds nothing
    assert cm.counts is not None and tuple(cm.counts.shape) == (3, k) and cm.counts.dtype == torch.int64
    assert cm.counts.numel() == cm.state_numel() == 3 * k <= 4 * k
    held = [v for v in vars(cm).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in held) <= 4 * k  # no other tensor state (no K x K anywhere)
    cm.reduce_from_all_processes()
    m = cm.compute()
    assert m.iou[7] == pytest.approx(1 / 2) and m.iou[21_840] == pytest.approx(1 / 3)
    assert int(np.isfinite(m.iou).sum()) == 2
    assert m.miou == pytest.approx(5 / 12)
    assert m.pixel_acc == pytest.approx(3 / 5)
    assert m.iou.shape == (k,) and m.tp.shape == (k,)
    labels = LabelCounts(k)
    assert labels.state_numel() == 3 * k + 1 <= 4 * k


def test_metrics_from_counts_validates() -> None:
    with pytest.raises(ValueError, match="three"):
        metrics_from_counts(np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="class 1: tp 2 exceeds"):
        metrics_from_counts(np.array([0, 2]), np.array([1, 1]), np.array([1, 2]))
    with pytest.raises(ValueError, match="negative"):
        metrics_from_counts(np.array([0, 0]), np.array([-1, 1]), np.array([1, 2]))


def test_label_counts_f1_hand_checked() -> None:
    # 3 images, K = 5 (multi-label sets):
    #   img a: true {1, 2}, pred {1}        -> class 1 tp; class 2 fn
    #   img b: true {2},    pred {2, 3}     -> class 2 tp; class 3 fp
    #   img c: true {4},    pred {}         -> class 4 fn
    #   tp = [0,1,1,0,0], gt = [0,1,2,0,1], pred = [0,1,1,1,0]
    #   micro F1 = 2*2 / (4 + 3) = 4/7; precision 2/3, recall 2/4
    #   per-class F1: c1 2/2 = 1, c2 2/3, c3 0, c4 0, c0 NaN -> macro (1 + 2/3) / 4 = 5/12
    lc = LabelCounts(5)
    lc.update([1], [1, 2])
    lc.update([2, 3, 3], [2])
    lc.update([], [4])
    lc.reduce_from_all_processes()
    m = lc.compute()
    np.testing.assert_array_equal(m.tp, [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(m.gt_images, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(m.pred_images, [0, 1, 1, 1, 0])
    assert m.micro_f1 == pytest.approx(4 / 7)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(0.5)
    assert m.macro_f1 == pytest.approx(5 / 12) and math.isnan(m.f1[0])
    assert m.num_images == 3
    with pytest.raises(ValueError, match=r"true label ids \[5\] outside 0..4"):
        lc.update([0], [5])
    assert math.isnan(LabelCounts(5).compute().micro_f1)  # nothing scored: NaN, not 0


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
    assert cm.compute().num_pixels == 0


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
        cm = IoUCounts(5)
        cm.update(pred[rank::world], target[rank::world])  # each rank sees half the images
        cm.reduce_from_all_processes()
        m = cm.compute()
        np.save(Path(out_dir) / f"rank{rank}.npy", np.stack([m.tp, m.gt_pixels, m.pred_pixels]))
        lc = LabelCounts(5)  # image-level sets: the image count travels in the same all_reduce
        for i in range(rank, pred.shape[0], world):
            lc.update(torch.unique(pred[i]), torch.unique(target[i][target[i] != 255]))
        lc.reduce_from_all_processes()
        lm = lc.compute()
        np.save(Path(out_dir) / f"labels{rank}.npy", np.r_[lm.tp, lm.gt_images, lm.pred_images, lm.num_images])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    pred, target = _data()
    single = IoUCounts(5)
    single.update(pred, target)
    expected = single.compute()
    lc = LabelCounts(5)
    for i in range(pred.shape[0]):
        lc.update(torch.unique(pred[i]), torch.unique(target[i][target[i] != 255]))
    exp_labels = lc.compute()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        counts = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_array_equal(counts, np.stack([expected.tp, expected.gt_pixels, expected.pred_pixels]))
        m = metrics_from_counts(*counts)
        assert m.miou == expected.miou
        np.testing.assert_array_equal(m.iou, expected.iou)
        labels = np.load(tmp_path / f"labels{rank}.npy")
        np.testing.assert_array_equal(labels, np.r_[exp_labels.tp, exp_labels.gt_images, exp_labels.pred_images, 6])
    assert expected.num_pixels == int((target != 255).sum())
