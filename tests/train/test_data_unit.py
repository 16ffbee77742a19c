"""Hand-checked pieces of train/data.py and train/loop.py (no Ray): augment, boxes, sampler, losses, LR."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from raysemiseg.labels import builtin
from raysemiseg.methods.base import Batch, Method, OptimizerGroup
from raysemiseg.data.schema import encode_image, encode_mask
from raysemiseg.train.data import (
    PAD_RGB, BatchSampler, augment_batch, augment_example, collate, render_box_bits,
    render_boxes, steps_per_epoch, strong_rows_per_batch,
)
from raysemiseg.train.loop import (
    build_optimizers, group_losses, poly_factor, set_lr, train_step,
)


def test_strong_rows_per_batch_rounds_half_up() -> None:
    assert [strong_rows_per_batch(8, f) for f in (0.0, 0.25, 0.5, 0.3, 1.0)] == [0, 2, 4, 2, 8]
    assert strong_rows_per_batch(10, 0.25) == 3  # 2.5 -> 3


def test_augment_pads_with_ignore_and_moves_labels_with_image() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, :3] = 200                      # left half bright
    mask = np.zeros((4, 6), np.int64)
    mask[:, :3] = 7                       # left half class 7
    out_img, (out_mask,) = augment_example(img, [mask], rng, crop=8, scale_range=(1.0, 1.0), flip=True,
                                           ignore_index=255)
    assert out_img.shape == (8, 8, 3) and out_mask.shape == (8, 8)
    # padding: 8x8 from 4x6 -> 32 - 24 = 40 pixels of ignore; the 12 class-7 pixels stay bright
    assert (out_mask == 255).sum() == 8 * 8 - 4 * 6
    assert (out_mask == 7).sum() == 12 and (out_img[out_mask == 7] == 200).all()
    assert (out_img[out_mask == 0] == 0).all()


def _store_rows(rows: list[dict[str, Any]]) -> "Any":
    """A pyarrow table of image-store rows (+ role, pseudo) as ``augment_batch`` receives them."""
    import pyarrow as pa

    cols = {k: [r.get(k) for r in rows] for k in ("image_id", "image", "mask", "labels", "boxes", "role", "pseudo")}
    return pa.table(cols)


def test_augment_batch_marks_padding_invalid() -> None:
    """Padded crop pixels are not image pixels: ``valid`` is False there (they must get no E-step
    label and no loss), True on every pixel that came from the image, also for weak rows."""
    img = np.full((4, 6, 3), 200, np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    rows = [{"image_id": "s", "image": encode_image(img, fmt="png"), "mask": encode_mask(mask), "labels": [],
             "role": "strong"},
            {"image_id": "w", "image": encode_image(img, fmt="png"), "mask": encode_mask(mask), "labels": [7],
             "role": "weak"}]
    out = augment_batch(_store_rows(rows), crop=8, scale_range=(1.0, 1.0), flip=True, ignore_index=255,
                        num_classes=21, uses_boxes=False, seed=0, rng=np.random.default_rng(0))
    valid = out["valid"]
    assert valid.shape == (2, 8, 8) and valid.dtype == bool
    assert valid.sum(axis=(1, 2)).tolist() == [24, 24]                     # 4 x 6 image pixels of 64
    for i in range(2):
        assert (out["image"][i][valid[i]] == 200).all()
        assert (out["image"][i][~valid[i]] == np.asarray(PAD_RGB, np.uint8)).all()
    assert (out["mask"][0][valid[0]] == 0).all() and (out["mask"][0][~valid[0]] == 255).all()
    b = collate(out, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    assert b.valid is not None and b.valid.dtype == torch.bool and int(b.valid.sum()) == 48
    assert b.select(torch.tensor([False, True])).valid.shape == (1, 8, 8)


def test_strong_rows_image_labels_follow_the_cropped_mask() -> None:
    """A strong row's image-level labels are the classes of its CROPPED mask (a class cropped out
    is no longer present; DecoupledNet pairs each present label with its mask): 4 x 8 image, class
    7 only in column 0, class 3 in columns 1..7, 4 x 4 crops. A weak row keeps the store's labels
    (its pixels are unknown). Background is set for every row."""
    img = np.full((4, 8, 3), 100, np.uint8)
    mask = np.full((4, 8), 3, np.uint8)
    mask[:, 0] = 7
    mask[0, 1] = 255                                    # void is never a label
    rows = [{"image_id": "s", "image": encode_image(img, fmt="png"), "mask": encode_mask(mask), "labels": [3, 7],
             "role": "strong"},
            {"image_id": "w", "image": encode_image(img, fmt="png"), "mask": encode_mask(mask), "labels": [3, 7],
             "role": "weak"}]
    seen = set()
    for seed in range(12):
        out = augment_batch(_store_rows(rows), crop=4, scale_range=(1.0, 1.0), flip=False, ignore_index=255,
                            num_classes=21, uses_boxes=False, seed=0, rng=np.random.default_rng(seed))
        has7 = bool((out["mask"][0] == 7).any())
        seen.add(has7)
        assert np.flatnonzero(out["labels"][0]).tolist() == ([0, 3, 7] if has7 else [0, 3])
        assert np.flatnonzero(out["labels"][1]).tolist() == [0, 3, 7]
    assert seen == {True, False}                        # both cases were drawn


def test_runs_that_train_on_pseudo_labels_need_a_label_store_covering_their_rows() -> None:
    """dual_branch / single_branch_mixed train weak rows (and, with weak_branch_strong_target
    "pseudo", strong rows) on label-store pseudo labels only: without a label store (or one that
    covers none of them) their loss would silently be 0 (review D16): refused; partly covered:
    a warning. WSSL is not refused: its weak
    rows without a stored label take the online E-step (documented precedence)."""
    from raysemiseg.methods.dual_branch import DualBranchParams, SingleBranchParams
    from raysemiseg.methods.wssl import WsslParams

    from raysemiseg.train.plan import check_pseudo_coverage, pseudo_label_roles

    assert pseudo_label_roles(DualBranchParams()) == ("weak",) and pseudo_label_roles(WsslParams()) == ()
    assert pseudo_label_roles(SingleBranchParams(use_weak=False)) == ()
    pseudo_strong = DualBranchParams(weak_branch_rows="all", weak_branch_strong_target="pseudo")
    assert set(pseudo_label_roles(pseudo_strong)) == {"strong", "weak"}
    # coverage: {role: (rows, rows without a pseudo label, a few of those ids)}
    with pytest.raises(ValueError, match="dual_branch.*data.label_store is not set"):
        check_pseudo_coverage("dual_branch", {"weak": (2, 2, [])}, None)
    with pytest.raises(ValueError, match=r"no pseudo label for any of the 2 weak"):
        check_pseudo_coverage("single_branch_mixed", {"weak": (2, 2, ["w0", "w1"])}, "LS")
    with pytest.warns(UserWarning, match=r"no pseudo label for 1 of the 2 weak.*'w1'"):
        check_pseudo_coverage("single_branch_mixed", {"weak": (2, 1, ["w1"])}, "LS")
    check_pseudo_coverage("dual_branch", {"weak": (2, 0, [])}, "LS")
    with pytest.raises(ValueError, match=r"strong.*'s0'"):
        check_pseudo_coverage("dual_branch", {"weak": (2, 0, []), "strong": (1, 1, ["s0"])}, "LS")
    check_pseudo_coverage("dual_branch", {"weak": (0, 0, [])}, None)   # no weak rows


def test_box_bits_keep_every_class_of_nested_boxes() -> None:
    """Per-class box regions for Bbox-EM-Fixed: bit c % 8 of byte c // 8 is set inside every box of
    class c, so a small box (class 9) inside a large one (class 2) leaves the large box's class set
    under it (the Bbox-Rect rendering keeps only the smaller box's id there)."""
    boxes = [{"class_id": 2, "x0": 0, "y0": 0, "x1": 4, "y1": 4}, {"class_id": 9, "x0": 1, "y0": 1, "x1": 3, "y1": 3}]
    bits = render_box_bits(boxes, 5, 5, num_classes=21)
    assert bits.shape == (3, 5, 5) and bits.dtype == np.uint8
    assert bits[0, 2, 2] == 1 << 2 and bits[1, 2, 2] == 1 << 1        # class 2: byte 0 bit 2; class 9: byte 1 bit 1
    assert bits[0, 0, 0] == 1 << 2 and bits[1, 0, 0] == 0 and (bits[:, 4, 4] == 0).all()
    assert render_boxes(boxes, 5, 5, 255)[2, 2] == 9                   # Bbox-Rect: smaller box on top
    assert (render_box_bits([], 2, 2, 21) == 0).all()
    with pytest.raises(ValueError, match="class_id 21"):
        render_box_bits([{"class_id": 21, "x0": 0, "y0": 0, "x1": 1, "y1": 1}], 2, 2, 21)


def test_augment_batch_box_bits_follow_the_crop_and_padding_has_none() -> None:
    img = np.full((4, 6, 3), 200, np.uint8)
    rows = [{"image_id": "w", "image": encode_image(img, fmt="png"), "labels": [3],
             "boxes": [{"class_id": 3, "x0": 0, "y0": 0, "x1": 6, "y1": 4}], "role": "weak"},
            {"image_id": "n", "image": encode_image(img, fmt="png"), "labels": [3], "boxes": None, "role": "weak"}]
    out = augment_batch(_store_rows(rows), crop=8, scale_range=(1.0, 1.0), flip=True, ignore_index=255,
                        num_classes=21, uses_boxes=True, seed=0, rng=np.random.default_rng(0))
    bits = out["box_bits"]
    assert bits.shape == (2, 3, 8, 8) and bits.dtype == np.uint8
    assert ((bits[0, 0] == 1 << 3) == out["valid"][0]).all()           # the whole image is inside the box; padding not
    assert (bits[1] == 0).all() and (out["box_mask"][1] == 255).all()  # no boxes: no bits, box mask all void
    b = collate(out, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    assert b.box_bits is not None and b.box_bits.dtype == torch.uint8 and b.box_bits.shape == (2, 3, 8, 8)


def test_box_rendering_stays_o1_per_pixel_at_imagenet21k() -> None:
    """At K = 21,841 per-class box bits would be ceil(K/8) = 2,731 bytes per pixel (137 MB per 224 px
    crop; the scale benchmark's CAM training ran out of memory on them): above MAX_BOX_BITS_CLASSES
    only the Bbox-Rect box mask (one label per pixel) is rendered. And only a method that reads the
    boxes (WSSL) has them rendered: cam_classifier trains on box rows' image labels only."""
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.data import MAX_BOX_BITS_CLASSES

    assert MAX_BOX_BITS_CLASSES == 256
    img = np.full((4, 6, 3), 200, np.uint8)
    rows = [{"image_id": "w", "image": encode_image(img, fmt="png"), "labels": [20_000],
             "boxes": [{"class_id": 20_000, "x0": 0, "y0": 0, "x1": 3, "y1": 4}], "role": "weak"}]
    out = augment_batch(_store_rows(rows), crop=8, scale_range=(1.0, 1.0), flip=False, ignore_index=65535,
                        num_classes=21_841, uses_boxes=True, seed=0, rng=np.random.default_rng(0))
    assert "box_bits" not in out
    assert out["box_mask"].shape == (1, 8, 8) and set(np.unique(out["box_mask"]).tolist()) <= {0, 20_000, 65535}
    assert (out["box_mask"][0][out["valid"][0]] == 20_000).sum() == 12      # the 3 x 4 box, at scale 1
    b = collate(out, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    assert b.box_bits is None and b.box_masks is not None
    assert get_method("wssl").renders_boxes and not get_method("cam_classifier").renders_boxes
    assert not get_method("strong_only").renders_boxes


def test_flip_is_applied_to_image_and_labels_alike() -> None:
    img = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    mask = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    for seed in range(6):
        out_img, (out_mask,) = augment_example(img, [mask], np.random.default_rng(seed), crop=4,
                                               scale_range=(1.0, 1.0), flip=True, ignore_index=255)
        flipped = out_mask[0, 0] == 3
        ref = img[:, ::-1] if flipped else img
        np.testing.assert_array_equal(out_img[:2], ref)


def test_bbox_rect_smaller_box_on_top() -> None:
    boxes = [{"class_id": 1, "x0": 0, "y0": 0, "x1": 4, "y1": 4}, {"class_id": 2, "x0": 1, "y0": 1, "x1": 3, "y1": 3}]
    m = render_boxes(boxes, 5, 5, 255)
    assert m[2, 2] == 2 and m[0, 0] == 1 and m[4, 4] == 0
    assert (render_boxes([], 2, 2, 255) == 255).all()


class _Shard:
    """A dataset shard stand-in: ``iter_batches`` over fixed rows (the real one is Ray's DataIterator)."""

    def __init__(self, ids: list[str], strong: bool) -> None:
        self.ids, self.strong = ids, strong

    def iter_batches(self, batch_size: int, **_: Any):
        for i in range(0, len(self.ids), batch_size):
            ids = self.ids[i:i + batch_size]
            yield {"image_id": np.array(ids, dtype=object), "is_strong": np.full(len(ids), self.strong),
                   "image": np.zeros((len(ids), 2, 2, 3), np.uint8)}


def test_sampler_fixed_strong_fraction_and_oversampling() -> None:
    shards = {"train_strong": _Shard(["s0", "s1", "s2"], True), "train_weak": _Shard([f"w{i}" for i in range(12)], False)}
    sampler = BatchSampler(shards, batch_size=4, strong_fraction=0.5)
    steps = steps_per_epoch({"train_strong": 3, "train_weak": 12}, 4, 0.5, num_workers=1)
    assert steps == 6  # one pass over the weak pool, 2 weak rows per batch
    seen_strong = []
    for _ in range(steps):
        b = sampler.next()
        assert b["is_strong"].tolist() == [True, True, False, False]
        seen_strong += b["image_id"][:2].tolist()
    assert seen_strong == ["s0", "s1", "s2"] * 4     # 3 strong rows cycled: oversampled 4x
    assert sampler.next()["image_id"][2:].tolist() == ["w0", "w1"]  # the weak pool starts its second pass
    assert sampler.pools["train_weak"].passes == 1


def test_sampler_single_pool_and_errors() -> None:
    s = BatchSampler({"train": _Shard(["a", "b", "c"], True)}, batch_size=2, strong_fraction=None)
    assert [s.next()["image_id"].tolist() for _ in range(3)] == [["a", "b"], ["c", "a"], ["b", "c"]]
    with pytest.raises(ValueError, match="train_weak"):
        BatchSampler({"train_strong": _Shard(["a"], True)}, batch_size=2, strong_fraction=0.5)
    empty = BatchSampler({"train": _Shard([], True)}, batch_size=2, strong_fraction=None)
    with pytest.raises(RuntimeError, match="no rows"):
        empty.next()


def test_sampler_augments_encoded_rows_in_the_worker_reproducibly(ray_session) -> None:
    """``data.augment_in: worker``: the shard (a real Ray Data iterator over encoded store rows) yields rows as
    stored and the sampler decodes and augments each fetch itself, with its pool's seeded generator: the same
    seed gives the same crops, another seed other crops; a weak row's mask is void, its pseudo label kept."""
    import ray.data

    img = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    mask = np.zeros((6, 10), np.uint8)
    mask[:, 5:] = 3
    rows = [{"image_id": "s", "image": encode_image(img, fmt="png"), "mask": encode_mask(mask), "labels": [3],
             "role": "strong"},
            {"image_id": "w", "image": encode_image(img, fmt="png"), "mask": encode_mask(mask), "labels": [3],
             "role": "weak", "pseudo": encode_mask(np.full((6, 10), 3, np.uint8))}]
    aug = dict(crop=8, scale_range=(0.5, 2.0), flip=True, ignore_index=255, num_classes=21, uses_boxes=False, seed=0)

    def two_batches(seed: int) -> list[dict[str, np.ndarray]]:
        shard = ray.data.from_arrow(_store_rows(rows)).iterator()
        s = BatchSampler({"train": shard}, batch_size=2, strong_fraction=None, seed=seed, augment=aug)
        return [s.next(), s.next()]

    a, b, c = two_batches(5), two_batches(5), two_batches(6)
    first = a[0]
    assert first["image"].shape == (2, 8, 8, 3) and first["image"].dtype == np.uint8
    assert first["image_id"].tolist() == ["s", "w"] and first["is_strong"].tolist() == [True, False]
    assert (first["mask"][1] == 255).all()                                  # a weak row never shows its mask
    assert set(np.unique(first["pseudo"][1][first["valid"][1]])) == {3}     # its pseudo label, on the image pixels
    assert set(np.unique(first["mask"][0][first["valid"][0]])) <= {0, 3}
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in x)                   # seeded: the same crops again
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))   # another seed, other crops


def test_collate_normalises_with_backbone_stats() -> None:
    rows = {"image": np.full((1, 2, 2, 3), 255, np.uint8), "mask": np.zeros((1, 2, 2), np.uint8),
            "pseudo": np.full((1, 2, 2), 255, np.uint8), "labels": np.array([[1, 0, 1]], np.uint8),
            "is_strong": np.array([True]), "image_id": np.array(["x"], dtype=object)}
    b = collate(rows, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert torch.allclose(b.images[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert b.masks.dtype == torch.int64 and b.pseudo[0, 0, 0] == 255 and b.image_ids == ["x"]
    # rows without a "valid" array: every pixel is valid
    assert b.valid is None and b.valid_mask().tolist() == [[[True, True], [True, True]]]


def test_poly_schedule() -> None:
    assert poly_factor(0, 100) == 1.0 and poly_factor(100, 100) == 0.0
    assert abs(poly_factor(50, 100, 0.9) - 0.5 ** 0.9) < 1e-12


class _TwoGroups(Method):
    """A segmenter (main) and a critic (disc) whose losses share a graph."""

    name: ClassVar[str] = "_two_groups_test"

    def __init__(self) -> None:
        super().__init__(builtin("voc21"), None)
        self.seg = nn.Linear(2, 2)
        self.critic = nn.Linear(2, 1)
        self.unused = nn.Linear(2, 2)

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        out = self.seg(batch.images)
        return {"ce": out.pow(2).mean(), "disc/adv": self.critic(out).mean()}

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        return [OptimizerGroup("main", [{"params": [*self.seg.parameters(), *self.unused.parameters()], "lr": lr}]),
                OptimizerGroup("disc", [{"params": list(self.critic.parameters()), "lr": lr * 2}], optimizer="adam")]


def test_each_group_steps_on_its_own_losses_only() -> None:
    torch.manual_seed(0)
    m = _TwoGroups()
    from raysemiseg.config import OptimConfig

    opts = build_optimizers(m, OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0))
    assert isinstance(opts["main"], torch.optim.SGD) and isinstance(opts["disc"], torch.optim.Adam)
    assert set_lr(opts, 0.5) == 0.05 and opts["disc"].param_groups[0]["lr"] == 0.1
    set_lr(opts, 1.0)
    batch = Batch(images=torch.randn(3, 2), masks=torch.zeros(3), pseudo=torch.zeros(3),
                  image_labels=torch.zeros(3, 21), is_strong=torch.ones(3, dtype=torch.bool))
    # expected SGD step of the segmenter: gradient of "ce" only (not of the critic's loss)
    x = batch.images
    w = m.seg.weight.detach().clone().requires_grad_(True)
    b = m.seg.bias.detach().clone().requires_grad_(True)
    (x @ w.T + b).pow(2).mean().backward()
    expected_w = m.seg.weight.detach() - 0.1 * w.grad
    unused_before = m.unused.weight.detach().clone()
    critic_before = m.critic.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    values = train_step(m, batch, opts, scaler, amp=False)
    assert set(values) == {"ce", "disc/adv"}
    assert torch.allclose(m.seg.weight, expected_w, atol=1e-6)
    assert torch.equal(m.unused.weight, unused_before)           # no gradient: untouched
    assert not torch.equal(m.critic.weight, critic_before)       # stepped by its own loss


def test_group_losses_routing_and_errors() -> None:
    t = torch.tensor(1.0)
    assert group_losses({"ce": t, "disc/adv": t}, ["main", "disc"]) == {"main": {"ce": t}, "disc": {"disc/adv": t}}
    with pytest.raises(ValueError, match="'gen'"):
        group_losses({"gen/x": t}, ["main"])


def test_pixel_only_methods_train_on_strong_rows_only(sample_store, tmp_path) -> None:
    """strong_only (``uses = ("pixel",)``) on a 25 %-strong split, strong_fraction null: its one
    pool holds the strong rows only (weak rows would carry no loss and dilute each batch); a method
    that uses weak rows (wssl) keeps every training row."""
    from raysemiseg.config import load_config
    from raysemiseg.data.splits import SplitSpec, make_split, split_counts, write_split
    from raysemiseg.train.plan import build_datasets

    table = make_split(sample_store, SplitSpec("i3s-fraction", fraction=0.25, seed=0))
    counts = split_counts(table)["train"]
    path = write_split(table, tmp_path / "split.parquet")
    rows = {}
    for name in ("strong_only", "wssl"):
        cfg = load_config({"data": {"store": str(sample_store), "split_file": str(path)}, "method": {"name": name}})
        rows[name] = build_datasets(cfg).pool_rows
    assert rows["strong_only"] == {"train": counts["strong"]}
    assert rows["wssl"] == {"train": counts["strong"] + counts["weak"]}
