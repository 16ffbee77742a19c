"""The training data plan (driver side): which store rows train and validate, with which role and
pseudo label, as streamed Ray datasets. The driver never holds the dataset.

What the driver does, and what it costs at the design card's scale (10M rows, 21,841 classes):

* **Planning scans** (:func:`scan_batches`): counts per role, the ``max_*_rows`` caps, the split
  file's checks and the pseudo-label coverage are streaming pyarrow scans of a few small columns
  (``image_id``, ``split``, ``supervision``, ``role``, ``recipe``) in record batches of
  :data:`SCAN_ROWS`: O(batch) memory on the driver, O(rows) time (about a second per million
  ids), no Ray round trips. Only counts, a few example ids and at most the capped ids stay.
* **Reads**: the training pools are a :class:`Rows` selection (split,
  ``supervision``, the cap's or the split file's ids) pushed into the Parquet scan with the column
  list (:func:`_read_rows`). Streamed (``data.cache_rows: false``): ``ray.data.read_parquet`` every
  pass, the file order reshuffled (seeded by ``run.seed``). Cached (the default): the rows are put
  once in the Ray object store (on the cluster) and their block order reshuffled every pass; a
  selection of at most ``data.local_read_mb`` MB is read by the driver in one pyarrow scan and its
  rows permuted once (a Ray Data read execution costs seconds of task start-up per run; the driver
  holds at most that many MB, whatever the store's size), a larger one by Ray Data read tasks. With the worker's local
  shuffle buffer this mixes a class-sorted (ImageNet-folder) store.
* **Validation** (:class:`ValRows`): the selection only (split, the cap's ids or the split
  file's path); each Train worker scans its share of the store files with pyarrow, so no Ray
  Data execution in the workers competes with the training stream for CPUs.
* **Roles and pseudo labels** (the split file and the label store, the "side table") are attached
  by a join on ``image_id``, chosen like Spark's ``autoBroadcastJoinThreshold``: a side table of
  at most ``data.broadcast_join_mb`` MB on disk is read once on the driver and broadcast to the read
  tasks (an Arrow table stored once in the object store; rows matched with a hash lookup,
  :func:`attach_side`); a larger one is joined by Ray Data's hash join
  (``Dataset.join(on=("image_id",))``), which never leaves the cluster. ``broadcast_join_mb: 0``
  always uses the Ray join.

Split file (``data.split_file``): Parquet with columns image_id, split, role (role in
:data:`ROLES`); it replaces the store's own split column, and rows with role ``none`` are dropped.
Without one, rows of ``data.train_split`` train with role ``strong`` when ``supervision ==
"pixel"`` and ``weak`` otherwise. Weak rows never expose their pixel mask (augmentation replaces
it with ``ignore_index``).
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from raysemiseg.data.splits import ROLES
from raysemiseg.data.store import hash_partitions
from raysemiseg.labels import LabelSpace
from raysemiseg.train.data import augment_batch, strong_rows_per_batch
#: rows per record batch of the driver's planning scans (a few MB of id strings)
SCAN_ROWS = 65_536
#: example ids kept for error messages
EXAMPLES = 3


@dataclass
class DataPlan:
    """What the driver hands to the worker group.

    Attributes:
        datasets: Ray datasets by name: ``"train"`` (one pool) or ``"train_strong"`` +
            ``"train_weak"`` (fixed strong fraction).
        pool_rows: rows per training pool (before sharding), e.g. ``{"train": 80}``.
        val: the validation rows (:class:`ValRows`: read by the workers, sharded over them).
        label_space: the store's label space (masks are in it).
        join: how roles and pseudo labels were attached: ``"none"`` (store columns only),
            ``"broadcast"`` or ``"ray"`` (Ray Data hash join).
        augment: None when the datasets yield augmented rows (``data.augment_in: ray_data``); with
            ``data.augment_in: worker`` they yield the encoded rows and this holds the keyword arguments
            of :func:`~raysemiseg.train.data.augment_batch`, which the worker applies to each fetch.
    """

    datasets: dict[str, Any]
    pool_rows: dict[str, int]
    val: ValRows
    label_space: LabelSpace
    join: str = "none"
    augment: dict[str, Any] | None = None

    @property
    def val_rows(self) -> int:
        """Number of validation rows."""
        return self.val.n_rows


# ----------------------------------------------------------------------------------------------
# Planning scans (driver, streaming, small columns only)
# ----------------------------------------------------------------------------------------------


def scan_batches(files: list[str] | list[Path], columns: list[str], filter: Any = None,
                 schema: pa.Schema | None = None, batch_rows: int = SCAN_ROWS) -> Iterator[pa.RecordBatch]:
    """Stream ``columns`` of Parquet ``files`` in record batches of at most ``batch_rows`` rows.

    Args:
        files: Parquet file paths.
        columns: the columns to read (the rest are never decoded).
        filter: a ``pyarrow.dataset`` expression, pushed into the scan (row groups skipped by
            their statistics).
        schema: the files' common schema (default: the first file's).
        batch_rows: rows per batch (default :data:`SCAN_ROWS`, for id columns; a few for image rows).

    Yields:
        ``pa.RecordBatch`` with ``columns``; memory stays O(``batch_rows``).
    """
    if not files:
        return
    ds = pads.dataset([str(f) for f in files], format="parquet", schema=schema)
    yield from ds.to_batches(columns=columns, filter=filter, batch_size=batch_rows)


def cap_keys(ids: list[str], seed: int) -> np.ndarray:
    """The cap's ordering key of each id: ``crc32("<seed>:<image_id>")`` (uint32 as int64)."""
    return np.fromiter((zlib.crc32(f"{seed}:{i}".encode()) for i in ids), np.int64, count=len(ids))


class SmallestK:
    """The ``k`` rows with the smallest :func:`cap_keys` (ties by id) seen over a stream of batches.

    Memory O(k + batch): the reproducible ``max_train_rows`` / ``max_val_rows`` subset without
    holding the stream. ``k = None`` keeps nothing (no cap).
    """

    def __init__(self, k: int | None, seed: int) -> None:
        self.k, self.seed = k, seed
        self._ids = np.empty(0, object)
        self._roles = np.empty(0, object)
        self._keys = np.empty(0, np.int64)

    def update(self, ids: list[str], roles: list[str]) -> None:
        if self.k is None or not ids:
            return
        all_ids = np.concatenate([self._ids, np.asarray(ids, object)])
        all_roles = np.concatenate([self._roles, np.asarray(roles, object)])
        all_keys = np.concatenate([self._keys, cap_keys(ids, self.seed)])
        if len(all_ids) > self.k:
            order = np.lexsort((all_ids.astype(str), all_keys))[:self.k]
            all_ids, all_roles, all_keys = all_ids[order], all_roles[order], all_keys[order]
        self._ids, self._roles, self._keys = all_ids, all_roles, all_keys

    def table(self) -> pa.Table:
        """The kept rows: (image_id, role) string columns."""
        return pa.table({"image_id": pa.array(self._ids.tolist(), pa.string()),
                         "role": pa.array(self._roles.tolist(), pa.string())})


@dataclass
class _Counts:
    """Per-role training counts and per-role pseudo-label coverage of one planning scan."""

    roles: dict[str, int] = field(default_factory=dict)
    lacking: dict[str, int] = field(default_factory=dict)     # rows of a role without a pseudo label
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, ids: pa.Array, roles: pa.Array, label_ids: pa.Array | None, needed: tuple[str, ...]) -> None:
        for r, n in zip(*_value_counts(roles)):
            self.roles[r] = self.roles.get(r, 0) + n
        if label_ids is None:
            return
        for role in needed:
            of_role = pc.filter(ids, pc.equal(roles, role))
            missing = pc.filter(of_role, pc.invert(pc.is_in(of_role, value_set=label_ids)))
            if len(missing):
                self.lacking[role] = self.lacking.get(role, 0) + len(missing)
                ex = self.examples.setdefault(role, [])
                ex.extend(missing[:max(0, EXAMPLES - len(ex))].to_pylist())


def _value_counts(arr: pa.Array) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(arr)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def _split_train_filter(d: Any) -> Any:
    return (pads.field("split") == d.train_split) & (pads.field("role") != "none")


def _train_meta(d: Any, store: Any, split_path: Path | None) -> Iterator[tuple[pa.Array, pa.Array]]:
    """Stream (image_id, role) of the training rows (before the cap) from the split file or the store."""
    if split_path is not None:
        for b in scan_batches([split_path], ["image_id", "role"], _split_train_filter(d)):
            yield b.column(0), b.column(1)
        return
    from raysemiseg.data.schema import IMAGE_STORE_SCHEMA

    for b in scan_batches(store.files, ["image_id", "supervision"], pads.field("split") == d.train_split,
                          IMAGE_STORE_SCHEMA):
        yield b.column(0), pc.if_else(pc.equal(b.column(1), "pixel"), "strong", "weak")


def check_split_file(path: Path) -> None:
    """Check a split file's columns and roles (a streaming scan of its ``role`` column).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column (image_id, split, role) or an unknown role (listed with the valid ones).
    """
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file {path} does not exist (write one with `raysemiseg data split`)")
    names = pq.read_schema(path).names
    missing = {"image_id", "split", "role"} - set(names)
    if missing:
        raise ValueError(f"split file {path} lacks columns {sorted(missing)} (has {names})")
    seen: set[Any] = set()
    for b in scan_batches([path], ["role"]):
        seen.update(pc.unique(b.column(0)).to_pylist())
    bad = seen - set(ROLES)
    if bad:
        raise ValueError(f"split file {path}: unknown roles {sorted(bad, key=str)}; valid: {list(ROLES)}")


def _unknown_split_ids_on_driver(path: Path, store: Any) -> tuple[int, list[str]]:
    """(count, a few) of the split file's ids that are not in the store: the split file's ids (a
    broadcast-size table) against a streaming scan of the store's ``image_id`` column."""
    from raysemiseg.data.schema import IMAGE_STORE_SCHEMA

    ids = pq.read_table(path, columns=["image_id"])["image_id"].combine_chunks()
    found = np.zeros(len(ids), bool)
    for b in scan_batches(store.files, ["image_id"], None, IMAGE_STORE_SCHEMA):
        found |= pc.is_in(ids, value_set=b.column(0)).to_numpy(zero_copy_only=False)
    unknown = pc.filter(ids, pa.array(~found))
    return len(unknown), sorted(unknown.to_pylist())[:EXAMPLES]


def _unknown_split_ids_on_ray(path: Path, store: Any) -> tuple[int, list[str]]:
    """The same check as :func:`_unknown_split_ids_on_driver` with a Ray Data anti-join."""
    import ray.data

    split = ray.data.read_parquet(str(path)).select_columns(["image_id"])
    unknown = split.join(store.dataset(columns=["image_id"]), join_type="left_anti",
                         num_partitions=_num_partitions(store), on=("image_id",)).materialize()
    n = unknown.count()
    return n, sorted(r["image_id"] for r in unknown.take(EXAMPLES)) if n else []


def _num_partitions(store: Any) -> int:
    """Hash partitions of a Ray Data join over ``store`` (:func:`~raysemiseg.data.store.hash_partitions`)."""
    return hash_partitions(len(store))


def label_shards(label_store: str | Path) -> list[Path]:
    """The label store's shard files (``LABELS/shards/**/*.parquet``), sorted.

    Raises:
        FileNotFoundError: no shards.
    """
    shards = sorted(Path(label_store, "shards").rglob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"label store {label_store} has no shards/*.parquet (run `raysemiseg pseudolabel`)")
    return shards


def check_recipe(label_store: str | Path, shards: list[Path], recipe: str | None) -> str | None:
    """The recipe to read from a label store (a streaming scan of its ``recipe`` column).

    Returns:
        ``recipe``, or None when the store holds a single recipe and none was asked for.

    Raises:
        ValueError: several recipes and none chosen (the recipes are listed), or an unknown recipe.
    """
    recipes: set[str] = set()
    for b in scan_batches(shards, ["recipe"]):
        recipes.update(pc.unique(b.column(0)).to_pylist())
    if recipe is None:
        if len(recipes) > 1:
            raise ValueError(f"label store {label_store} holds recipes {sorted(recipes)}; set data.label_recipe")
        return None
    if recipe not in recipes:
        raise ValueError(f"label store {label_store} has no recipe {recipe!r}; valid: {sorted(recipes)}")
    return recipe


def _recipe_filter(recipe: str | None) -> Any:
    return None if recipe is None else pads.field("recipe") == recipe


def pseudo_label_roles(params: Any) -> tuple[str, ...]:
    """The row roles a method trains on label-store pseudo labels (``params.pseudo_label_roles()``,
    e.g. ``("weak",)`` for ``dual_branch``), () for methods without the hook."""
    hook = getattr(params, "pseudo_label_roles", None)
    return tuple(hook()) if callable(hook) else ()


def check_pseudo_coverage(method: str, coverage: dict[str, tuple[int, int, list[str]]],
                          label_store: str | Path | None) -> None:
    """Refuse a run whose method trains some rows on label-store pseudo labels that it lacks.

    A method declares the row roles it trains on ``batch.pseudo`` through
    ``params.pseudo_label_roles()`` (``dual_branch``, ``single_branch_mixed``; see
    :func:`pseudo_label_roles`); without a stored label such rows are all ``ignore_index`` and
    their loss would silently be 0. Methods without the hook (e.g. ``wssl``, whose weak rows
    without a stored label take the online E-step) pass.

    Args:
        method: the method name (for the message).
        coverage: ``{role: (training rows of the role, rows without a pseudo label, a few of
            their image ids)}`` for each role the method trains on pseudo labels (after
            ``data.max_train_rows``).
        label_store: ``data.label_store``.

    Raises:
        ValueError: rows of a needed role exist but ``data.label_store`` is unset, or the store
            covers none of them. A store that misses only some of them gives a warning naming their
            count and a few ids (those rows add nothing to the loss).
    """
    for role, (rows, missing, examples) in coverage.items():
        if not rows:
            continue
        if not label_store:
            raise ValueError(
                f"method {method!r} trains its {role} rows on label-store pseudo labels, but data.label_store is "
                f"not set ({rows} {role} training rows would train on nothing); build one with "
                "`raysemiseg pseudolabel` and set data.label_store")
        if missing == rows:
            raise ValueError(
                f"data.label_store {label_store} has no pseudo label for any of the {rows} {role} training "
                f"rows of method {method!r}, e.g. {examples}: wrong label store, or recipe run on other splits?")
        if missing:
            warnings.warn(
                f"data.label_store {label_store} has no pseudo label for {missing} of the {rows} {role} "
                f"training rows of method {method!r}, e.g. {examples} (quarantined, or outside the recipe's "
                "splits or max_rows): those rows train on nothing; relabel them or give them role 'none' in the "
                "split file", stacklevel=2)


# ----------------------------------------------------------------------------------------------
# Attaching roles and pseudo labels (Ray Data stages)
# ----------------------------------------------------------------------------------------------


def attach_side(batch: pa.Table, side: pa.Table | None, role: str | None, roles_from_side: bool) -> pa.Table:
    """Ray Data stage: add ``role`` and ``pseudo`` columns to store rows (the broadcast join).

    Args:
        batch: store rows (with ``supervision`` unless ``roles_from_side``).
        side: the broadcast side table, columns image_id (unique) and ``role`` (with a split
            file) and/or ``pseudo`` (label-store PNG bytes); None = no side table.
        role: keep only rows of this role (a pool), None = every role.
        roles_from_side: roles come from ``side.role`` (a split file): rows absent from ``side``
            are dropped (not in the split file's training rows); else from ``supervision``
            (pixel rows strong, the rest weak) and rows absent from ``side`` get a null ``pseudo``.

    Returns:
        ``batch`` (minus ``supervision``) with string ``role`` and binary ``pseudo`` columns.
    """
    idx = None if side is None else pc.index_in(batch["image_id"], value_set=side["image_id"].combine_chunks())
    if roles_from_side:
        keep = pc.is_valid(idx)
        batch, idx = batch.filter(keep), pc.filter(idx, keep)
        roles = pc.take(side["role"], idx)
    else:
        roles = pc.if_else(pc.equal(batch["supervision"], "pixel"), "strong", "weak")
    if role is not None:
        keep = pc.equal(roles, role)
        batch, roles = batch.filter(keep), pc.filter(roles, keep)
        idx = None if idx is None else pc.filter(idx, keep)
    if "supervision" in batch.column_names:
        batch = batch.drop_columns(["supervision"])
    if side is not None and "pseudo" in side.column_names:
        pseudo = pc.take(side["pseudo"], idx)
    else:
        pseudo = pa.nulls(batch.num_rows, pa.binary())
    return batch.append_column("role", roles.cast(pa.string())).append_column("pseudo", pseudo.cast(pa.binary()))


def _finish_joined(batch: pa.Table, role: str | None, roles_from_split: bool, has_pseudo: bool) -> pa.Table:
    """Ray Data stage after the Ray hash joins: the ``role`` column (from the split file, or from
    ``supervision``), a null ``pseudo`` column when no label store was joined, ``supervision`` dropped."""
    if not roles_from_split:
        roles = pc.if_else(pc.equal(batch["supervision"], "pixel"), "strong", "weak")
        if role is not None:
            keep = pc.equal(roles, role)
            batch, roles = batch.filter(keep), pc.filter(roles, keep)
        batch = batch.append_column("role", roles)
    if "supervision" in batch.column_names:
        batch = batch.drop_columns(["supervision"])
    if not has_pseudo:
        batch = batch.append_column("pseudo", pa.nulls(batch.num_rows, pa.binary()))
    return batch


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


def _pixel_only(method_name: str) -> bool:
    """Whether the method's ``uses`` is pixel labels alone (its weak rows would carry no loss)."""
    from raysemiseg.methods.base import get_method

    return tuple(get_method(method_name).uses) == ("pixel",)


def side_table_bytes(split_path: Path | None, shards: list[Path]) -> int:
    """On-disk bytes of the side table (split file + label-store shards): the join's size test."""
    return (split_path.stat().st_size if split_path is not None else 0) + sum(p.stat().st_size for p in shards)


def _pools(cfg: Any, counts: dict[str, int]) -> dict[str, tuple[str | None, int]]:
    """``{pool name: (role or None, rows)}`` from the per-role training counts.

    Raises:
        ValueError: a pool that ``data.strong_fraction`` (or a pixel-only method) needs is empty.
    """
    d = cfg.data
    if d.strong_fraction is None and _pixel_only(cfg.method.name):
        # a method that trains from pixel labels alone (strong_only) gets batches of strong rows only:
        # weak rows in its batches would carry no loss and dilute every step (25 % strong split:
        # 2 of 8 crops per batch would train)
        if not counts.get("strong"):
            raise ValueError(f"method {cfg.method.name!r} trains from pixel labels only, but split "
                             f"{d.train_split!r} of {d.store} has no strong rows")
        return {"train": ("strong", counts["strong"])}
    if d.strong_fraction is None:
        return {"train": (None, sum(counts.values()))}
    pools: dict[str, tuple[str | None, int]] = {
        "train_strong": ("strong", counts.get("strong", 0)), "train_weak": ("weak", counts.get("weak", 0))}
    k_s = strong_rows_per_batch(d.batch_size, d.strong_fraction)
    for name, k in (("train_strong", k_s), ("train_weak", d.batch_size - k_s)):
        if k > 0 and not pools[name][1]:
            raise ValueError(
                f"data.strong_fraction={d.strong_fraction} needs {k} {name[6:]} rows per batch, but split "
                f"{d.train_split!r} has no {name[6:]} rows")
        if k == 0:
            del pools[name]
    return pools


def build_datasets(cfg: Any, uses_boxes: bool = False) -> DataPlan:
    """Ray datasets for a run: planning scans on the driver, streamed reads and joins on Ray.

    See the module docstring for what runs where. The training pools' rows are decoded and
    augmented by :func:`~raysemiseg.train.data.augment_batch` in Ray Data tasks.

    Args:
        cfg: :class:`raysemiseg.config.TrainConfig`.
        uses_boxes: render Bbox-Rect box masks (``Batch.box_masks``) and per-class box bits
            (``Batch.box_bits``) for the method.

    Raises:
        ValueError: a pool needed by ``data.strong_fraction`` is empty, no training or no
            validation rows, the store's label space differs from ``cfg.label_space``, the split
            file is malformed or names ids that are not in the store (their count and a few are
            listed), or the method trains rows on pseudo labels that ``data.label_store`` lacks
            (:func:`check_pseudo_coverage`).
        FileNotFoundError: no split file / label store shards where configured.
    """
    from raysemiseg.data.store import open_store
    from raysemiseg.labels import load_label_space
    from raysemiseg.train.data import quiet_ray_data

    d = cfg.data
    seed = int(cfg.run.seed)
    store = open_store(d.store)
    space = store.label_space
    want = load_label_space(cfg.label_space)
    if tuple(want.names) != tuple(space.names):
        raise ValueError(
            f"label_space {cfg.label_space!r} ({want.num_classes} classes) differs from the store's "
            f"{space.name!r} ({space.num_classes} classes); set label_space to match the store")
    needed = pseudo_label_roles(cfg.method.build_params())
    split_path = Path(d.split_file) if d.split_file is not None else None
    if split_path is not None:
        check_split_file(split_path)
    shards = label_shards(d.label_store) if d.label_store else []
    recipe = check_recipe(d.label_store, shards, d.label_recipe) if d.label_store else None
    if split_path is None and not shards:
        join = "none"
    elif side_table_bytes(split_path, shards) <= d.broadcast_join_mb * 2**20:
        join = "broadcast"
    else:
        join = "ray"

    if split_path is not None:
        n_unknown, some = (_unknown_split_ids_on_driver if join == "broadcast" else _unknown_split_ids_on_ray)(
            split_path, store)
        if n_unknown:
            raise ValueError(f"split file {split_path}: {n_unknown} image ids are not in the store, e.g. {some}")

    # the label store's ids (broadcast: on the driver, for coverage; its PNGs join the side table)
    labels = None
    if join == "broadcast" and shards:
        labels = pa.concat_tables(
            [pq.read_table(s, columns=["image_id", "recipe", "mask"], filters=_recipe_filter(recipe))
             for s in shards]).select(["image_id", "mask"]).rename_columns(["image_id", "pseudo"]).combine_chunks()

    # one planning scan over the training rows: per-role counts, the cap, and (broadcast) coverage
    counts, cap = _Counts(), SmallestK(d.max_train_rows, seed)
    label_ids = labels["image_id"].combine_chunks() if labels is not None else None
    for ids, roles in _train_meta(d, store, split_path):
        if d.max_train_rows is None:
            counts.add(ids, roles, label_ids, needed)
        cap.update(ids.to_pylist(), roles.to_pylist())
    cap_table = cap.table() if d.max_train_rows is not None else None
    if cap_table is not None:
        if join == "ray" and shards and needed:   # the capped rows' coverage: scan the label ids
            label_ids = _label_ids_among(shards, recipe, cap_table["image_id"].combine_chunks())
        counts.add(cap_table["image_id"].combine_chunks(), cap_table["role"].combine_chunks(), label_ids, needed)
    if not sum(counts.roles.values()):
        raise ValueError(f"no training rows: split {d.train_split!r} is empty in {d.store}")
    coverage: dict[str, tuple[int, int, list[str]]] = {}
    for role in needed:
        n = counts.roles.get(role, 0)
        if not shards:
            coverage[role] = (n, n, [])
        elif label_ids is None:                     # Ray join, no cap: an anti-join on the cluster
            coverage[role] = (n, *_lacking_on_ray(d, store, split_path, shards, recipe, role))
        else:
            coverage[role] = (n, counts.lacking.get(role, 0), counts.examples.get(role, []))
    check_pseudo_coverage(cfg.method.name, coverage, d.label_store)
    pools = _pools(cfg, counts.roles)

    quiet_ray_data()  # the training datasets run in the worker group: no bars there
    columns = ["image_id", "image", "mask", "labels"] + (["boxes"] if uses_boxes else [])
    cap_ids = tuple(cap_table["image_id"].to_pylist()) if cap_table is not None else None
    aug: dict[str, Any] = dict(crop=d.crop_size, scale_range=tuple(d.scale_range), flip=d.flip,
                               ignore_index=space.ignore_index, num_classes=space.num_classes,
                               uses_boxes=uses_boxes, seed=seed)
    side = _broadcast_side(d, split_path, labels, cap_table) if join == "broadcast" else None
    datasets: dict[str, Any] = {}
    in_worker = d.augment_in == "worker"
    for i, (name, (role, n_rows)) in enumerate(pools.items()):
        pool_seed = seed * 1009 + i
        if join == "ray":
            ds = _ray_joined(d, store, split_path, shards, recipe, role, columns, cap_ids, pool_seed)
        else:
            ds = _broadcast_joined(d, store, split_path, side, role, columns, cap_ids, n_rows, pool_seed)
        datasets[name] = ds if in_worker else ds.map_batches(augment_batch, fn_kwargs=aug, batch_format="pyarrow",
                                                              batch_size=16)
    val = _val_rows(d, store, split_path, seed)
    if not val.n_rows:
        raise ValueError(f"no validation rows: split {d.val_split!r} is empty in {d.store}")
    return DataPlan(datasets=datasets, pool_rows={name: n for name, (_, n) in pools.items()}, val=val,
                    label_space=space, join=join, augment=aug if in_worker else None)


def _label_ids_among(shards: list[Path], recipe: str | None, ids: pa.Array) -> pa.Array:
    """The label store's ids (of ``recipe``) that are among ``ids`` (a streaming scan; O(len(ids)))."""
    found = []
    for b in scan_batches(shards, ["image_id"], _recipe_filter(recipe)):
        found.append(pc.filter(b.column(0), pc.is_in(b.column(0), value_set=ids)))
    return pa.concat_arrays(found) if found else pa.array([], pa.string())


def _lacking_on_ray(d: Any, store: Any, split_path: Path | None, shards: list[Path], recipe: str | None,
                    role: str) -> tuple[int, list[str]]:
    """(count, a few ids) of the training rows of ``role`` without a pseudo label: a Ray anti-join."""
    import ray.data
    from ray.data.expressions import col, lit

    if split_path is not None:
        meta = ray.data.read_parquet(str(split_path)).filter(
            expr=(col("split") == lit(d.train_split)) & (col("role") == lit(role))).select_columns(["image_id"])
    else:
        pixel = col("supervision") == lit("pixel")
        meta = store.dataset(columns=["image_id"], filter_split=d.train_split,
                             where=pixel if role == "strong" else ~pixel)
    lacking = meta.join(_ray_labels(shards, recipe).select_columns(["image_id"]), join_type="left_anti",
                        num_partitions=_num_partitions(store), on=("image_id",)).materialize()
    n = lacking.count()
    return n, sorted(r["image_id"] for r in lacking.take(EXAMPLES)) if n else []


def _ray_labels(shards: list[Path], recipe: str | None) -> Any:
    """The label store's rows of ``recipe`` as a Ray dataset (image_id, pseudo)."""
    import ray.data
    from ray.data.expressions import col, lit

    ds = ray.data.read_parquet([str(s) for s in shards])
    if recipe is not None:
        ds = ds.filter(expr=col("recipe") == lit(recipe))
    return ds.select_columns(["image_id", "mask"]).rename_columns({"mask": "pseudo"})


def _broadcast_side(d: Any, split_path: Path | None, labels: pa.Table | None,
                    cap_table: pa.Table | None) -> pa.Table | None:
    """The broadcast side table: (image_id, role) of the split file's training rows (capped) and/or
    (image_id, pseudo) of the label store; joined on the driver (both are broadcast-size)."""
    if split_path is None:
        return labels
    roles = pq.read_table(split_path, columns=["image_id", "split", "role"], filters=_split_train_filter(d))
    roles = roles.select(["image_id", "role"])
    if cap_table is not None:
        roles = roles.filter(pc.is_in(roles["image_id"], value_set=cap_table["image_id"].combine_chunks()))
    roles = roles.combine_chunks()
    if labels is None:
        return roles
    idx = pc.index_in(roles["image_id"], value_set=labels["image_id"].combine_chunks())
    return roles.append_column("pseudo", pc.take(labels["pseudo"], idx))


@dataclass(frozen=True)
class Rows:
    """A selection of store rows, pushed into either reader (Ray Data or the driver's pyarrow scan).

    Attributes:
        split: keep rows of this ``split`` value (None = any).
        pixel: keep rows with ``supervision == "pixel"`` (True), without (False), or both (None).
        ids: keep rows whose ``image_id`` is in this tuple (None = any).
    """

    split: str | None = None
    pixel: bool | None = None
    ids: tuple[str, ...] | None = None

    def ray_expr(self) -> Any:
        """The selection as a ``ray.data.expressions`` predicate, or None (``split`` is passed apart)."""
        from ray.data.expressions import col, lit

        pred = None
        if self.pixel is not None:
            pixel = col("supervision") == lit("pixel")
            pred = pixel if self.pixel else ~pixel
        if self.ids is not None:
            ids = col("image_id").is_in(list(self.ids))
            pred = ids if pred is None else pred & ids
        return pred

    def arrow_expr(self) -> Any:
        """The whole selection as a ``pyarrow.dataset`` expression, or None."""
        parts = []
        if self.split is not None:
            parts.append(pads.field("split") == self.split)
        if self.pixel is not None:
            pixel = pads.field("supervision") == "pixel"
            parts.append(pixel if self.pixel else ~pixel)
        if self.ids is not None:
            parts.append(pads.field("image_id").isin(list(self.ids)))
        out = None
        for e in parts:
            out = e if out is None else out & e
        return out


def row_bytes(store: Any, columns: list[str], sample_files: int = 4) -> float:
    """Mean on-disk bytes of one row's ``columns`` (compressed), from the Parquet footers of the
    store's first ``sample_files`` files: O(1) in the store size."""
    total = rows = 0
    for f in store.files[:sample_files]:
        md = pq.ParquetFile(f).metadata
        names = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            rows += rg.num_rows
            total += sum(rg.column(j).total_compressed_size for j in range(md.num_columns) if names[j] in columns)
    return total / rows if rows else 0.0


def _read_rows(d: Any, store: Any, columns: list[str], sel: Rows, n_rows: int, seed: int,
               side: pa.Table | None = None, role: str | None = None, roles_from_side: bool = False,
               attach: bool = True) -> Any:
    """The selected store rows (with ``role``/``pseudo`` attached by :func:`attach_side` when
    ``attach``) as a Ray dataset whose order changes at every pass.

    * ``data.cache_rows`` and a selection of at most ``data.local_read_mb`` MB (``n_rows`` x
      :func:`row_bytes`): the driver reads it in one pyarrow scan with the selection pushed down,
      attaches the side table, permutes the rows (seeded) and puts them into the object store in
      blocks of 32 rows (``ray.data.from_arrow``); a Ray Data read execution costs seconds of task start-up per run on
      a small machine, this costs milliseconds. The driver holds at most ``local_read_mb``, whatever
      the store's size.
    * ``data.cache_rows`` and a larger selection: Ray Data read tasks, materialized once in the
      object store (on the cluster).
    * otherwise: streamed from Parquet by Ray Data at every pass (file order reshuffled).

    Either way the block or file order is reshuffled at every pass (seeded: reproducible).
    """
    import ray.data
    from ray.data import RandomSeedConfig

    from raysemiseg.data.schema import IMAGE_STORE_SCHEMA

    cols = columns + ([] if roles_from_side or not attach else ["supervision"])
    if d.cache_rows and n_rows * row_bytes(store, cols) <= d.local_read_mb * 2**20:
        t = pa.Table.from_batches(list(scan_batches(store.files, cols, sel.arrow_expr(), IMAGE_STORE_SCHEMA)),
                                  schema=pa.schema([IMAGE_STORE_SCHEMA.field(c) for c in cols]))
        if attach:
            t = attach_side(t, side, role, roles_from_side)
        t = t.take(np.random.default_rng(seed).permutation(t.num_rows))   # blocks of random rows, not store runs
        blocks = [t.slice(i, 32) for i in range(0, max(t.num_rows, 1), 32)]
        return ray.data.from_arrow(blocks).randomize_block_order(
            seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    ds = store.dataset(columns=cols, filter_split=sel.split, shuffle_seed=seed, where=sel.ray_expr())
    if attach:
        ds = ds.map_batches(attach_side, fn_kwargs={"side": side, "role": role, "roles_from_side": roles_from_side},
                            batch_format="pyarrow", batch_size=256)
    return _cached(ds, seed) if d.cache_rows else ds


def _broadcast_joined(d: Any, store: Any, split_path: Path | None, side: pa.Table | None, role: str | None,
                      columns: list[str], cap_ids: tuple[str, ...] | None, n_rows: int, seed: int) -> Any:
    """A pool's store rows with ``role``/``pseudo`` attached by :func:`attach_side` (broadcast)."""
    from_split = split_path is not None
    if from_split:
        side = side.filter(pc.equal(side["role"], role)) if role is not None else side
        # the split file's (capped) training ids of this pool, pushed into the scan
        sel = Rows(ids=tuple(side["image_id"].to_pylist()) if cap_ids is None else cap_ids)
    else:
        sel = Rows(split=d.train_split, pixel=None if role is None else role == "strong", ids=cap_ids)
    return _read_rows(d, store, columns, sel, n_rows, seed, side=side, role=role, roles_from_side=from_split)


def _ray_joined(d: Any, store: Any, split_path: Path | None, shards: list[Path], recipe: str | None,
                role: str | None, columns: list[str], cap_ids: tuple[str, ...] | None, seed: int) -> Any:
    """A pool's store rows with ``role``/``pseudo`` attached by Ray Data hash joins on image_id."""
    import ray.data
    from ray.data.expressions import col, lit

    on = ("image_id",)
    parts = _num_partitions(store)
    where = None if cap_ids is None else col("image_id").is_in(list(cap_ids))
    if split_path is not None:
        ds = store.dataset(columns=columns, shuffle_seed=seed, where=where)
        pred = (col("split") == lit(d.train_split)) & (col("role") != lit("none"))
        if role is not None:
            pred = pred & (col("role") == lit(role))
        roles = ray.data.read_parquet(str(split_path)).filter(expr=pred).select_columns(["image_id", "role"])
        ds = ds.join(roles, join_type="inner", num_partitions=parts, on=on)
    else:
        if role is not None:
            pixel = col("supervision") == lit("pixel")
            pred = pixel if role == "strong" else ~pixel
            where = pred if where is None else where & pred
        ds = store.dataset(columns=columns + ["supervision"], filter_split=d.train_split, shuffle_seed=seed,
                           where=where)
    if shards:
        ds = ds.join(_ray_labels(shards, recipe), join_type="left_outer", num_partitions=parts, on=on)
    ds = ds.map_batches(_finish_joined, fn_kwargs={"role": role, "roles_from_split": split_path is not None,
                                                   "has_pseudo": bool(shards)}, batch_format="pyarrow")
    return _cached(ds, seed) if d.cache_rows else ds


@dataclass(frozen=True)
class ValRows:
    """The validation rows, read by the Train workers themselves: each worker scans its share of
    the store's files with pyarrow (the selection and the columns pushed into the scan) and scores
    every row it reads, so each row is read and counted once over the worker group.

    Why not a Ray dataset: a worker's own Ray Data execution would compete with the training
    stream's execution for the same CPUs. Ray Data (2.60) reserves cluster resources for each
    execution first come, first served, so while the training stream's epoch runs (on a store of
    millions of rows, for hours) a validation read in the worker gets no CPU and waits: the 10N
    training start of ``benchmarks/scale.py`` waited minutes for it. A pyarrow scan in the worker
    takes no Ray resources and costs O(validation rows / workers) per worker.

    Attributes:
        files: the store's Parquet files (paths every node can read: ``data.store`` is checked).
        columns: columns read (image_id, image, mask, labels).
        split: keep store rows of this ``split`` (no split file, no cap), else None.
        ids: keep these image ids (the ``max_val_rows`` cap), else None.
        split_file: ids of the split file's rows with ``split == split_file_split`` (read by each
            worker: O(validation ids)), else None.
        split_file_split: see ``split_file``.
        n_rows: number of validation rows (over all workers).
    """

    files: tuple[str, ...]
    columns: tuple[str, ...] = ("image_id", "image", "mask", "labels")
    split: str | None = None
    ids: tuple[str, ...] | None = None
    split_file: str | None = None
    split_file_split: str | None = None
    n_rows: int = 0

    @cached_property
    def _filter(self) -> Any:
        """The pushed-down selection (the split file's val ids are read once per worker, then kept)."""
        if self.split_file is not None:
            ids = pq.read_table(self.split_file, columns=["image_id"],
                                filters=pads.field("split") == self.split_file_split)["image_id"]
            return pads.field("image_id").isin(ids.combine_chunks())
        return Rows(split=self.split, ids=self.ids).arrow_expr()

    def shard(self, rank: int = 0, world: int = 1, batch_rows: int = 8) -> tuple[Iterator[pa.RecordBatch], bool]:
        """This worker's record batches of at most ``batch_rows`` rows, and whether they are its own rows only.

        With at least ``world`` files, worker ``rank`` scans files ``rank::world`` (True: every row
        it reads is its own); with fewer, every worker scans them all and the caller keeps rows
        ``i % world == rank`` (False).
        """
        from raysemiseg.data.schema import IMAGE_STORE_SCHEMA

        own = len(self.files) >= world
        files = list(self.files[rank::world]) if own else list(self.files)
        return scan_batches(files, list(self.columns), self._filter, IMAGE_STORE_SCHEMA, batch_rows), own


def _val_rows(d: Any, store: Any, split_path: Path | None, seed: int) -> ValRows:
    """The validation selection (a planning scan of the val ids: the count and the cap's subset)."""
    from raysemiseg.data.schema import IMAGE_STORE_SCHEMA

    cap = SmallestK(d.max_val_rows, seed)
    n = 0
    if split_path is not None:
        batches = scan_batches([split_path], ["image_id"], pads.field("split") == d.val_split)
    else:
        batches = scan_batches(store.files, ["image_id"], pads.field("split") == d.val_split, IMAGE_STORE_SCHEMA)
    for b in batches:
        ids = b.column(0).to_pylist()
        n += len(ids)
        cap.update(ids, [""] * len(ids))
    files = tuple(str(f) for f in store.files)
    if d.max_val_rows is not None:
        ids = tuple(cap.table()["image_id"].to_pylist())
        return ValRows(files=files, ids=ids, n_rows=len(ids))
    if split_path is None:
        return ValRows(files=files, split=d.val_split, n_rows=n)
    return ValRows(files=files, split_file=str(split_path), split_file_split=d.val_split, n_rows=n)


def _cached(ds: Any, seed: int) -> Any:
    """``ds`` materialized in the Ray object store (encoded rows, on the cluster), block order
    reshuffled at every pass (seeded: pass ``e`` of a run gets its own reproducible order)."""
    from ray.data import RandomSeedConfig

    return ds.materialize().randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def describe_plan(plan: DataPlan) -> str:
    """One line for logs: pools, rows, label space, join."""
    return json.dumps({"pools": plan.pool_rows, "val_rows": plan.val_rows, "label_space": plan.label_space.name,
                       "join": plan.join})
