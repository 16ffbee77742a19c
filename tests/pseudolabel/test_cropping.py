"""Combinatorial cropping (DecoupledNet Sec. 4.4): 2^|L| - 1 masks per image, crops enclose the
subset mask, the online (torch) version the segment stage runs, image-store batch function (pure
and through Ray Data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysemiseg.data.schema import decode_image, decode_mask, encode_image, encode_mask
from raysemiseg.pseudolabel.cropping import (
    combinatorial_crop_batch,
    combinatorial_crops,
    enclosing_boxes,
    label_subsets,
    online_combinatorial_crops,
    subset_mask,
)


def scene() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((40, 50), dtype=np.int64)
    mask[5:15, 5:15] = 3
    mask[20:30, 30:45] = 7
    mask[32:38, 2:10] = 11
    mask[0, :] = 255
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    return rgb, mask


@pytest.mark.parametrize("labels", [[3], [3, 7], [3, 7, 11]])
def test_2_to_the_L_minus_1_masks(labels: list[int]) -> None:
    rgb, mask = scene()
    samples = combinatorial_crops(rgb, mask, labels, num_crops=3, rng=np.random.default_rng(1))
    subsets = {s.subset for s in samples}
    assert len(subsets) == 2 ** len(labels) - 1
    assert len(samples) == 3 * (2 ** len(labels) - 1)
    for s in samples:
        full = np.isin(mask, s.subset).sum()
        assert (s.binary == 1).sum() == full  # the crop encloses the whole subset mask
        assert s.image.shape[:2] == s.mask.shape == s.binary.shape
        assert set(np.unique(s.mask)) <= set(s.subset) | {0, 255}


def test_subset_mask_hand_checked() -> None:
    m = np.array([[0, 3, 7], [255, 7, 11]])
    cm, b = subset_mask(m, (7,))
    assert cm.tolist() == [[0, 0, 7], [255, 7, 0]]
    assert b.tolist() == [[0, 0, 1], [255, 1, 0]]


def test_subsets_order_and_cap() -> None:
    assert label_subsets([7, 3]) == [(3,), (7,), (3, 7)]
    assert len(label_subsets(range(1, 11), max_labels=8)) == 11  # singletons + full set
    with pytest.raises(ValueError, match="at least one"):
        label_subsets([])


def test_enclosing_boxes_contain_mask() -> None:
    b = np.zeros((20, 30), dtype=np.uint8)
    b[4:9, 10:20] = 1
    boxes = enclosing_boxes(b, 50, np.random.default_rng(0))
    assert (boxes[:, 0] <= 4).all() and (boxes[:, 2] >= 9).all() and (boxes[:, 1] <= 10).all() and (boxes[:, 3] >= 20).all()
    assert (boxes[:, 2] <= 20).all() and (boxes[:, 3] <= 30).all() and (boxes[:, :2] >= 0).all()
    assert len({tuple(x) for x in boxes}) > 10  # random, not one box


FG = torch.arange(1, 21)


def online_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scene() as a batch of 2 rows: row 0 strong with labels {3, 7, 11}, row 1 unlabelled."""
    rgb, mask = scene()
    images = torch.from_numpy(rgb).permute(2, 0, 1).float()[None].repeat(2, 1, 1, 1)
    masks = torch.from_numpy(mask)[None].repeat(2, 1, 1)
    labels = torch.zeros(2, 21)
    labels[:, 0] = 1
    labels[0, [3, 7, 11]] = 1
    return images, masks, labels


def test_online_crops_enclose_the_subset_and_give_z_P() -> None:
    """Each crop: a subset P of the row's labels, a box containing every pixel of P (the same
    count of P pixels inside the box as in the image), the crop resized to the batch size, and
    z^P = the nearest-resized binary mask of the box (1 on P, 0 on other labels and background,
    255 on void)."""
    images, masks, labels = online_inputs()
    out = online_combinatorial_crops(images, masks, labels, torch.tensor([True, True]), FG, num_crops=12,
                                     rng=np.random.default_rng(0))
    assert out.images.shape == (12, 3, 40, 50) and out.targets.shape == (12, 40, 50)
    assert out.rows.tolist() == [0] * 12                      # row 1 has no label: no crop
    m = masks[0].numpy()
    seen = set()
    for q in range(12):
        subset = tuple(int(c) for c in out.subsets[q].nonzero().flatten())
        seen.add(subset)
        assert set(subset) <= {3, 7, 11} and subset
        y0, x0, y1, x1 = out.boxes[q].tolist()
        assert np.isin(m[y0:y1, x0:x1], subset).sum() == np.isin(m, subset).sum()
        _, binary = subset_mask(m[y0:y1, x0:x1], subset)
        ref = torch.nn.functional.interpolate(torch.from_numpy(binary.astype(np.float32))[None, None],
                                              size=(40, 50), mode="nearest")[0, 0].long()
        assert torch.equal(out.targets[q], ref)
        assert (y1 - y0) >= 10 and (x1 - x0) >= 12          # at least a quarter of each side
    assert len(seen) >= 4                                    # subsets drawn, not always the same


def test_online_crop_of_the_whole_image_is_the_image() -> None:
    """A label whose pixels touch all four borders: its only enclosing box is the whole image, so
    the crop is the image itself and z^P its binary mask (hand-checked 2 x 3 case)."""
    images = torch.arange(2 * 3, dtype=torch.float32).view(1, 1, 2, 3)
    masks = torch.tensor([[[5, 0, 0], [255, 0, 5]]])
    labels = torch.zeros(1, 21)
    labels[0, 5] = 1
    out = online_combinatorial_crops(images, masks, labels, torch.tensor([True]), FG, 1, np.random.default_rng(1),
                                     min_size_frac=0.5)
    assert out.boxes.tolist() == [[0, 0, 2, 3]]
    assert torch.equal(out.images, images)
    assert out.targets.tolist() == [[[1, 0, 0], [255, 0, 1]]]


def test_online_crops_with_an_absent_label_and_bad_input() -> None:
    """A listed label without pixels (cropped away) gives an all-background target, not a crash;
    no labelled row gives an empty crop batch; bad arguments are errors."""
    images, masks, labels = online_inputs()
    labels[1, 19] = 1                                         # row 1: label 19, no pixel of it
    out = online_combinatorial_crops(images, masks, labels, torch.tensor([False, True]), FG, 3,
                                     np.random.default_rng(2))
    assert out.rows.tolist() == [1, 1, 1]
    assert set(out.targets.unique().tolist()) <= {0, 255}
    empty = online_combinatorial_crops(images, masks, labels, torch.tensor([False, False]), FG, 3,
                                       np.random.default_rng(2))
    assert empty.images.shape == (0, 3, 40, 50) and empty.targets.shape == (0, 40, 50)
    with pytest.raises(ValueError, match="num_crops"):
        online_combinatorial_crops(images, masks, labels, torch.tensor([True, True]), FG, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="masks"):
        online_combinatorial_crops(images, masks[:, :10], labels, torch.tensor([True, True]), FG, 1,
                                   np.random.default_rng(0))


def store_rows() -> dict[str, np.ndarray]:
    rgb, mask = scene()
    rows = {
        "image_id": ["s/1", "s/2"], "source": ["t", "t"], "split": ["train", "train"],
        "supervision": ["pixel", "image"], "image": [encode_image(rgb, "png"), encode_image(rgb, "png")],
        "image_format": ["png", "png"], "mask": [encode_mask(mask), None],
        "labels": [np.array([3, 7], dtype=np.int32), np.array([11], dtype=np.int32)],
        "boxes": [[], []], "height": [40, 40], "width": [50, 50],
    }
    out = {}
    for k, v in rows.items():
        a = np.empty(len(v), dtype=object)
        a[:] = v
        out[k] = a
    return out


def test_batch_function_rows_and_determinism() -> None:
    out = combinatorial_crop_batch(store_rows(), num_crops=2, seed=5)
    assert len(out["image_id"]) == 3 * 2 + 1  # (2^2 - 1) * N_p crops + the weak row passed through
    assert out["image_id"][-1] == "s/2" and out["mask"][-1] is None
    assert out["image_id"][0] == "s/1#crop-3-0" and out["image_id"][5] == "s/1#crop-3+7-1"
    for i in range(6):
        img, m = decode_image(out["image"][i]), decode_mask(out["mask"][i])
        assert img.shape[:2] == m.shape == (out["height"][i], out["width"][i])
        assert set(np.unique(m)) <= set(out["labels"][i].tolist()) | {0, 255}
    again = combinatorial_crop_batch(store_rows(), num_crops=2, seed=5)
    assert [decode_mask(x).shape for x in again["mask"][:6]] == [decode_mask(x).shape for x in out["mask"][:6]]


def test_through_ray_data(ray_session) -> None:
    import ray

    rows = store_rows()
    items = [{k: rows[k][i] for k in rows} for i in range(2)]
    ds = ray.data.from_items(items).map_batches(combinatorial_crop_batch, batch_format="numpy",
                                                fn_kwargs={"num_crops": 2, "seed": 5})
    got = sorted(r["image_id"] for r in ds.take_all())
    assert len(got) == 7 and got[-1] == "s/2"
