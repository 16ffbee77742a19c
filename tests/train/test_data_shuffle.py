"""Global shuffle and the streaming training plan on a class-sorted (ImageNet-style) folder store.

The ``folders`` reader sorts rows by class folder, so the store holds 16 runs of 12 same-class
rows, in Parquet files of 2 rows (96 files). A training batch of 8 drawn in store order through
an 8-row local shuffle buffer sees a window of at most ~24 consecutive rows, i.e. at most 3
classes; with the file order reshuffled every pass, a batch holds rows of many files, hence
many classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysemiseg.config import load_config
from raysemiseg.labels import builtin
from raysemiseg.train.data import BatchSampler, iter_val_rows
from raysemiseg.train.plan import build_datasets

CLASSES = builtin("voc21").names[1:17]         # 16 foreground classes, one folder each
PER_CLASS = 12
BATCH = 8
#: mean distinct classes per batch of 8 that the shuffled plan must reach. Store order through an
#: 8-row buffer spans <= 3 classes per batch (12 same-class rows in a row), so it cannot pass.
MIN_MEAN_CLASSES = 5.0


def _folder_tree(root: Path, classes: tuple[str, ...], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):  # random pixels: distinct bytes, so no row is a duplicate
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def sorted_store(ray_session, tmp_path_factory) -> Path:
    from raysemiseg.data.store import Source, build_store

    base = tmp_path_factory.mktemp("sorted")
    train = _folder_tree(base / "imagenet", CLASSES, PER_CLASS, seed=0)
    val = _folder_tree(base / "imagenet_val", CLASSES[:1], 2, seed=1)
    out = base / "store"
    build_store([Source("folders", (str(train),)), Source("folders", (str(val),), {"split": "val"})], "voc21", out,
                rows_per_file=2)
    return out


def _cfg(store: Path, **data):
    """cache_rows (the default) reads these small selections on the driver: the cheap path for tests;
    the streamed and Ray-joined paths are tested where they are named."""
    return load_config({"data": {"store": str(store), "batch_size": BATCH, "shuffle_buffer": 8, "crop_size": 32,
                                 "scale_range": [1.0, 1.0], **data},
                        "method": {"name": "cam_classifier"}, "model": {"backbone": "tiny", "pretrained": False}})


def _batch_classes(sampler: BatchSampler, steps: int) -> list[int]:
    """Distinct foreground classes in each of ``steps`` batches (the rows' image-level labels)."""
    out = []
    for _ in range(steps):
        labels = sampler.next()["labels"][:, 1:]          # column 0: background, set for every row
        out.append(len(set(np.flatnonzero(labels.any(axis=0)).tolist())))
    return out


def test_store_is_class_sorted_in_many_files(sorted_store: Path) -> None:
    from raysemiseg.data.store import open_store

    store = open_store(sorted_store)
    assert len(store.files) == (16 * PER_CLASS + 2) // 2
    labels = store.read_table(["labels"], filter_split="train")["labels"].to_pylist()
    assert [x[0] for x in labels] == [c for c in range(1, 17) for _ in range(PER_CLASS)]  # class runs


@pytest.mark.parametrize("cache_rows", [False, True], ids=["streaming", "cache_rows"])
def test_training_batches_mix_classes_of_a_class_sorted_store(sorted_store: Path, cache_rows: bool) -> None:
    plan = build_datasets(_cfg(sorted_store, cache_rows=cache_rows))
    assert plan.pool_rows == {"train": 16 * PER_CLASS} and plan.val_rows == 2
    sampler = BatchSampler({"train": plan.datasets["train"]}, batch_size=BATCH, strong_fraction=None,
                           shuffle_buffer=8, seed=0)
    per_batch = _batch_classes(sampler, steps=16 * PER_CLASS // BATCH)       # one pass: 24 batches
    assert np.mean(per_batch) >= MIN_MEAN_CLASSES, per_batch
    # every row of the pass was seen once: a shuffle, not a sample
    assert sampler.pools["train"].passes == 0
    again = _batch_classes(sampler, steps=16 * PER_CLASS // BATCH)          # the second pass, reshuffled
    assert np.mean(again) >= MIN_MEAN_CLASSES and sampler.pools["train"].passes >= 1
    val = [r["image_id"] for r in iter_val_rows(plan.val)]
    assert sorted(val) == ["imagenet_val/aeroplane/00", "imagenet_val/aeroplane/01"]


def test_validation_rows_are_sharded_over_the_workers_each_counted_once(sorted_store: Path, tmp_path: Path) -> None:
    """The workers read validation with pyarrow, no Ray Data execution (it would wait for the training
    stream's CPUs): with a split file naming the 12 dog rows as val, 3 workers each read their own third
    of the 97 files and together score the 12 rows exactly once; a store of fewer files than workers is
    read by every worker, which keeps rows i % world == rank."""
    from raysemiseg.data.store import open_store
    from raysemiseg.train.plan import ValRows

    ids = open_store(sorted_store).read_table(["image_id"])["image_id"].to_pylist()
    dogs = sorted(i for i in ids if i.startswith("imagenet/dog/"))
    assert len(dogs) == 12
    pq.write_table(pa.table({"image_id": ids, "split": ["val" if i in dogs else "train" for i in ids],
                             "role": ["weak"] * len(ids)}), tmp_path / "split.parquet")
    plan = build_datasets(_cfg(sorted_store, split_file=str(tmp_path / "split.parquet")))
    assert isinstance(plan.val, ValRows) and plan.val_rows == 12 and "val" not in plan.datasets
    per_rank = [[r["image_id"] for r in iter_val_rows(plan.val, rank, 3)] for rank in range(3)]
    assert sorted(i for rows in per_rank for i in rows) == dogs          # each once, none else
    shards = [plan.val.shard(rank, 3) for rank in range(3)]
    assert all(own for _, own in shards)                                 # 97 files >= 3: own files
    assert [sum(b.num_rows for b in it) for it, _ in shards] == [len(r) for r in per_rank]  # reads only its rows
    one_file = ValRows(files=plan.val.files[:1], n_rows=2)               # fewer files than workers
    both = [[r["image_id"] for r in iter_val_rows(one_file, rank, 2)] for rank in range(2)]
    first = pq.read_table(plan.val.files[0], columns=["image_id"])["image_id"].to_pylist()
    assert len(first) == 2 and both[0] == first[:1] and both[1] == first[1:]


def test_split_file_roles_join_and_strong_rows_without_mask_fail_naming_the_row(sorted_store: Path,
                                                                               tmp_path: Path) -> None:
    """Roles come from the split file (a broadcast join by image_id): role 'none' rows are dropped,
    and a 'strong' row whose store row has no mask stops training with an error naming it."""
    join_mb = 64.0
    from raysemiseg.data.store import open_store

    ids = open_store(sorted_store).read_table(["image_id", "split"])
    roles = ["none" if i.startswith("imagenet/cat/") else "weak" for i in ids["image_id"].to_pylist()]
    split = pa.table({"image_id": ids["image_id"], "split": ids["split"], "role": roles})
    pq.write_table(split, tmp_path / "split.parquet")
    plan = build_datasets(_cfg(sorted_store, split_file=str(tmp_path / "split.parquet"), broadcast_join_mb=join_mb))
    assert plan.join == ("broadcast" if join_mb else "ray")
    assert plan.pool_rows == {"train": 15 * PER_CLASS}
    seen = [i for b in plan.datasets["train"].iter_batches(batch_size=64) for i in b["image_id"]]
    assert len(seen) == 15 * PER_CLASS and not any("/cat/" in i for i in seen)

    bad = split.set_column(2, "role", pa.array(["strong" if i == "imagenet/dog/03" else r
                                                for i, r in zip(ids["image_id"].to_pylist(), roles)]))
    pq.write_table(bad, tmp_path / "bad.parquet")
    plan = build_datasets(_cfg(sorted_store, split_file=str(tmp_path / "bad.parquet"), broadcast_join_mb=join_mb))
    with pytest.raises(Exception, match=r"row imagenet/dog/03: role 'strong' but the store holds no pixel mask"):
        for _ in plan.datasets["train"].iter_batches(batch_size=64):
            pass


def test_split_file_naming_ids_outside_the_store_is_refused(sorted_store: Path, tmp_path: Path) -> None:
    """Checked on the driver for a broadcast-size split file (the Ray Data anti-join of larger ones
    runs in test_split_roles_and_pseudo_labels_attach_to_their_own_rows[ray_join])."""
    join_mb = 64.0
    split = pa.table({"image_id": ["imagenet/cat/00", "nope/1", "nope/2"], "split": ["train"] * 3,
                      "role": ["weak"] * 3})
    pq.write_table(split, tmp_path / "split.parquet")
    with pytest.raises(ValueError, match=r"2 image ids are not in the store, e.g. \['nope/1', 'nope/2'\]"):
        build_datasets(_cfg(sorted_store, split_file=str(tmp_path / "split.parquet"), broadcast_join_mb=join_mb))


def test_max_train_rows_is_a_reproducible_subset(sorted_store: Path) -> None:
    ids = []
    for _ in range(2):
        plan = build_datasets(_cfg(sorted_store, max_train_rows=10, max_val_rows=1))
        assert plan.pool_rows == {"train": 10} and plan.val_rows == 1
        ids.append(sorted(i for b in plan.datasets["train"].iter_batches(batch_size=64) for i in b["image_id"]))
    assert ids[0] == ids[1] and len(set(ids[0])) == 10


@pytest.mark.parametrize("join_mb", [64.0, 0.0], ids=["broadcast", "ray_join"])
def test_split_roles_and_pseudo_labels_attach_to_their_own_rows(sorted_store: Path, tmp_path: Path, join_mb) -> None:
    """Split-file roles and label-store pseudo labels reach the rows they belong to, in both join
    modes (broadcast; Ray Data hash joins when the side table is over ``broadcast_join_mb``): the
    split file drops the cat rows (role none); the label of ``imagenet/<class>/<i>`` is a constant
    mask of class id 1 + i for i < 6, rows 6..11 have none and train with an all-void pseudo map
    (cam_classifier has no coverage hook). The 8 x 8 images are padded to the 32 px crop with void."""
    from raysemiseg.data.schema import encode_mask
    from raysemiseg.data.store import open_store

    ids = open_store(sorted_store).read_table(["image_id", "split"])
    roles = ["none" if i.startswith("imagenet/cat/") else "weak" for i in ids["image_id"].to_pylist()]
    pq.write_table(pa.table({"image_id": ids["image_id"], "split": ids["split"], "role": roles}),
                   tmp_path / "split.parquet")
    labelled = [f"imagenet/{c}/{i:02d}" for c in CLASSES for i in range(6)]
    masks = [encode_mask(np.full((8, 8), 1 + int(i[-2:]), np.uint8)) for i in labelled]
    (tmp_path / "labels" / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": labelled, "recipe": ["r"] * len(labelled),
                             "mask": pa.array(masks, pa.binary())}),
                   tmp_path / "labels" / "shards" / "part-00000.parquet")
    plan = build_datasets(_cfg(sorted_store, label_store=str(tmp_path / "labels"), broadcast_join_mb=join_mb,
                               split_file=str(tmp_path / "split.parquet"), shuffle_buffer=0,
                               cache_rows=bool(join_mb), max_val_rows=1))
    assert plan.join == ("broadcast" if join_mb else "ray")
    assert plan.pool_rows == {"train": 15 * PER_CLASS} and plan.val_rows == 1
    seen = {}
    for b in plan.datasets["train"].iter_batches(batch_size=64):
        for i, p in zip(b["image_id"], b["pseudo"]):
            seen[i] = set(np.unique(p).tolist()) - {255}      # 255: void (padding, or no label)
    assert len(seen) == 15 * PER_CLASS and not any("/cat/" in i for i in seen)
    for i, values in seen.items():
        k = int(i[-2:])
        assert values == ({1 + k} if k < 6 else set()), (i, values)
