"""Combinatorial cropping (DecoupledNet Sec. 5): 2^|L| - 1 masks per image, crops enclose the
subset mask, image-store batch function (pure and through Ray Data)."""

from __future__ import annotations

import numpy as np
import pytest

from raysemiseg.data.schema import decode_image, decode_mask, encode_image, encode_mask
from raysemiseg.pseudolabel.cropping import (
    combinatorial_crop_batch,
    combinatorial_crops,
    enclosing_boxes,
    label_subsets,
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
