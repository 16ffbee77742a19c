"""Training and validation data: store rows -> Ray Data -> decode/augment -> mixed batches -> :class:`Batch`.

Driver side (:func:`build_datasets`) decides which store rows train and validate and with which
role, and returns Ray Data datasets for the Ray Train worker group:

* the row roles come from the split file (``data.split_file``: columns image_id, split, role) when
  set, else from the store: ``split`` column, role ``strong`` for ``supervision == "pixel"`` rows
  and ``weak`` otherwise. ``role == "none"`` rows are dropped. Weak rows never expose their pixel
  mask (it is replaced by ``ignore_index``), whatever the store holds.
* pseudo labels (``data.label_store``) are joined by ``image_id`` for the rows the store covers
  (broadcast join: the label store's ``image_id -> mask PNG`` map travels with the map task;
  label PNGs are a few KB, so tens of MB for 10k images).
* decode + augment (random scale, random crop padded with ``ignore_index`` / mean colour, random
  horizontal flip) run in Ray Data ``map_batches`` tasks, off the training process, and emit
  fixed-size uint8/int arrays. Normalisation with the backbone's mean/std happens on the worker's
  device in :func:`collate` (uint8 travels through the object store: 4x smaller than float32).

Worker side: :class:`BatchSampler` turns the worker's dataset shards into an endless stream of
mixed mini-batches. With ``data.strong_fraction = f`` every batch of ``B`` rows holds exactly
``k_s = round(f * B)`` strong rows and ``B - k_s`` weak rows (WSSL semi-supervised setting,
Papandreou et al. 2015 Sec. 3.4; dual-branch k strong + k weak, Luo & Yang 2020 Sec. 3), drawn from
two pools that cycle independently: an epoch is one pass over the weak pool, so the (usually
smaller) strong pool is oversampled. Methods never see any of this: they receive a :class:`Batch`.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from raysemiseg.data.schema import decode_image, decode_mask
from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch

ROLES = ("strong", "weak", "none")
#: pad colour of crops (ImageNet mean, RGB uint8): zero after normalisation
PAD_RGB = (124, 116, 104)


# ----------------------------------------------------------------------------------------------
# Driver side: which rows, which role
# ----------------------------------------------------------------------------------------------


@dataclass
class DataPlan:
    """What the driver hands to the worker group.

    Attributes:
        datasets: Ray datasets by name: ``"train"`` (one pool) or ``"train_strong"`` +
            ``"train_weak"`` (fixed strong fraction), and ``"val"`` (raw rows, not split).
        pool_rows: rows per training pool (before sharding), e.g. ``{"train": 80}``.
        val_rows: number of validation rows.
        label_space: the store's label space (masks are in it).
        split_names: names of the datasets that Ray Train shards equally across workers.
        unequal_split_names: names of the datasets sharded without dropping rows (validation),
            see :func:`sharded_data_config`.
    """

    datasets: dict[str, Any]
    pool_rows: dict[str, int]
    val_rows: int
    label_space: LabelSpace
    split_names: list[str] = field(default_factory=list)
    unequal_split_names: list[str] = field(default_factory=list)


def _progress(on: bool) -> Any:
    """Context manager: Ray Data progress bars on (planning passes) or off, restored after."""
    from contextlib import contextmanager

    from ray.data import DataContext

    @contextmanager
    def cm() -> Iterator[None]:
        ctx = DataContext.get_current()
        old = ctx.enable_progress_bars, ctx.print_on_execution_start
        ctx.enable_progress_bars = on
        ctx.print_on_execution_start = False
        try:
            yield
        finally:
            ctx.enable_progress_bars, ctx.print_on_execution_start = old

    return cm()


def _count_by(ds: Any, key: str) -> dict[str, int]:
    """``{value: rows}`` of column ``key`` of a Ray dataset (``groupby(key).count()``, on Ray)."""
    out: dict[str, int] = {}
    for r in ds.groupby(key).count().take_all():
        n = [v for k, v in r.items() if k != key][0]
        out[str(r[key])] = int(n)
    return out


def _num_partitions(store: Any) -> int:
    """Hash partitions of the training joins: one per ~8 store files (64 rows each), 1..10,000."""
    return max(1, min(10_000, len(store.files) // 8))


def check_split_file(path: str | Path, store: Any) -> Any:
    """Open a split file as a Ray dataset after checking it (on Ray, nothing per row on the driver).

    Args:
        path: Parquet split file (columns image_id, split, role; ``raysemiseg data split``).
        store: the opened image store.

    Returns:
        ``ray.data.Dataset`` of the split file's (image_id, split, role) rows.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the split file lacks a column, holds an unknown role, or names image ids
            that are not in the store (their count and the first few are listed).
    """
    import ray.data

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file {path} does not exist (write one with `raysemiseg data split`)")
    names = pq.read_schema(path).names
    missing = {"image_id", "split", "role"} - set(names)
    if missing:
        raise ValueError(f"split file {path} lacks columns {sorted(missing)} (has {names})")
    split = ray.data.read_parquet(str(path)).select_columns(["image_id", "split", "role"])
    bad_roles = set(split.unique("role")) - set(ROLES)
    if bad_roles:
        raise ValueError(f"split file {path}: unknown roles {sorted(bad_roles, key=str)}; valid: {list(ROLES)}")
    unknown = split.select_columns(["image_id"]).join(
        store.dataset(columns=["image_id"]), join_type="left_anti", num_partitions=_num_partitions(store),
        on=("image_id",)).materialize()
    n_unknown = unknown.count()
    if n_unknown:
        some = sorted(r["image_id"] for r in unknown.take(3))
        raise ValueError(f"split file {path}: {n_unknown} image ids are not in the store, e.g. {some}")
    return split


def _cap_ids(meta: Any, cap: int | None, seed: int) -> list[str] | None:
    """``cap`` image ids of the dataset ``meta`` (column image_id) chosen reproducibly from ``seed``.

    The rows with the ``cap`` smallest ``crc32("<seed>:<image_id>")`` (ties by id), found with a
    Ray Data sort; only the chosen ids come to the driver. None when ``cap`` is None.
    """
    if cap is None:
        return None
    keyed = meta.select_columns(["image_id"]).map_batches(_cap_key, fn_kwargs={"seed": seed}, batch_format="pyarrow")
    return [r["image_id"] for r in keyed.sort(["_cap_key", "image_id"]).limit(cap).take_all()]


def _cap_key(batch: pa.Table, seed: int) -> pa.Table:
    keys = [zlib.crc32(f"{seed}:{i}".encode()) for i in batch["image_id"].to_pylist()]
    return batch.append_column("_cap_key", pa.array(keys, pa.int64()))


def _label_ids(label_store: str | Path, recipe: str | None, check: bool = True) -> Any:
    """The label store's rows of one recipe as a Ray dataset (image_id, pseudo).

    Args:
        label_store: the label store directory (``LABELS/shards/*.parquet``).
        recipe: which recipe's rows to use; required when the store holds more than one.
        check: check ``recipe`` against the recipes the store holds (one pass over that column).

    Raises:
        FileNotFoundError: no shards.
        ValueError: several recipes and none chosen (the recipes are listed), or an unknown recipe.
    """
    import ray.data
    from ray.data.expressions import col, lit

    shards = sorted(Path(label_store, "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"label store {label_store} has no shards/*.parquet (run `raysemiseg pseudolabel`)")
    ds = ray.data.read_parquet([str(s) for s in shards])
    recipes = sorted(ds.select_columns(["recipe"]).unique("recipe")) if check else [recipe]
    if recipe is None and not check:
        pass
    elif recipe is None:
        if len(recipes) > 1:
            raise ValueError(f"label store {label_store} holds recipes {recipes}; set data.label_recipe")
    elif recipe not in recipes:
        raise ValueError(f"label store {label_store} has no recipe {recipe!r}; valid: {recipes}")
    else:
        ds = ds.filter(expr=col("recipe") == lit(recipe))
    return ds.select_columns(["image_id", "mask"]).rename_columns({"mask": "pseudo"})


def _pixel_only(method_name: str) -> bool:
    """Whether the method's ``uses`` is pixel labels alone (its weak rows would carry no loss)."""
    from raysemiseg.methods.base import get_method

    return tuple(get_method(method_name).uses) == ("pixel",)


def pseudo_label_roles(params: Any) -> tuple[str, ...]:
    """The row roles a method trains on label-store pseudo labels (``params.pseudo_label_roles()``,
    e.g. ``("weak",)`` for ``dual_branch``), () for methods without the hook."""
    hook = getattr(params, "pseudo_label_roles", None)
    return tuple(hook()) if callable(hook) else ()


class _Rows:
    """The training rows of a run, as lazily built Ray datasets (driver side, nothing read here).

    ``meta(role)`` gives (image_id, role) of the training rows of a role (all roles: None), from
    the split file (joined) or the store's ``supervision`` column; ``rows(role, ...)`` the store
    rows themselves with ``role`` and ``pseudo`` columns, ready for :func:`augment_batch`.
    """

    def __init__(self, cfg: Any, store: Any, split: Any | None, cap: list[str] | None,
                 labels: Any | None) -> None:
        self.cfg, self.store, self.split, self.cap, self.labels = cfg, store, split, cap, labels
        self.d = cfg.data

    def _split_ids(self, role: str | None) -> Any:
        from ray.data.expressions import col, lit

        pred = (col("split") == lit(self.d.train_split)) & (col("role") != lit("none"))
        if role is not None:
            pred = pred & (col("role") == lit(role))
        if self.cap is not None:
            pred = pred & col("image_id").is_in(self.cap)
        return self.split.filter(expr=pred).select_columns(["image_id", "role"])

    def _where(self, role: str | None) -> Any:
        from ray.data.expressions import col, lit

        pred = None
        if self.split is None and role is not None:
            pixel = col("supervision") == lit("pixel")
            pred = pixel if role == "strong" else ~pixel
        if self.cap is not None:
            ids = col("image_id").is_in(self.cap)
            pred = ids if pred is None else pred & ids
        return pred

    def meta(self, role: str | None = None) -> Any:
        """(image_id, role) of the training rows of ``role`` (None: every training role)."""
        if self.split is not None:
            return self._split_ids(role)
        ds = self.store.dataset(columns=["image_id", "supervision"], filter_split=self.d.train_split,
                                where=self._where(role))
        return ds.map_batches(_finish_rows, fn_kwargs={"role": role, "pseudo": False}, batch_format="pyarrow")

    def rows(self, role: str | None, columns: list[str], shuffle_seed: int) -> Any:
        """Store rows of the training ``role`` (None: all) with ``role`` and ``pseudo`` columns."""
        on = ("image_id",)
        if self.split is not None:
            ds = self.store.dataset(columns=columns, filter_split=self.d.train_split, shuffle_seed=shuffle_seed,
                                    where=self._where(None))
            ds = ds.join(self._split_ids(role), join_type="inner", num_partitions=_num_partitions(self.store), on=on)
            fix: dict[str, Any] = {"role": None, "pseudo": self.labels is None, "from_split": True}
        else:
            cols = columns + ["supervision"]
            ds = self.store.dataset(columns=cols, filter_split=self.d.train_split, shuffle_seed=shuffle_seed,
                                    where=self._where(role))
            fix = {"role": role, "pseudo": self.labels is None}
        if self.labels is not None:
            ds = ds.join(self.labels, join_type="left_outer", num_partitions=_num_partitions(self.store), on=on)
        return ds.map_batches(_finish_rows, fn_kwargs=fix, batch_format="pyarrow")


def _finish_rows(batch: pa.Table, role: str | None, pseudo: bool, from_split: bool = False) -> pa.Table:
    """Ray Data stage: the ``role`` column (``role``, or from ``supervision``: pixel rows strong,
    the rest weak, unless it came from the split file), a null ``pseudo`` column when ``pseudo``;
    ``supervision`` dropped."""
    if not from_split:
        if role is None:
            value = pc.if_else(pc.equal(batch["supervision"], "pixel"), "strong", "weak")
        else:
            value = pa.array([role] * batch.num_rows, pa.string())
        batch = batch.append_column("role", value)
    if "supervision" in batch.column_names:
        batch = batch.drop_columns(["supervision"])
    if pseudo:
        batch = batch.append_column("pseudo", pa.nulls(batch.num_rows, pa.binary()))
    return batch


def build_datasets(cfg: Any, uses_boxes: bool = False, progress: bool = True) -> DataPlan:
    """Ray datasets for a run (driver side): a plan of streamed Parquet reads, nothing read here.

    The planning passes (split-file checks, pool row counts, the ``max_*_rows`` caps, pseudo-label
    coverage) run on Ray over id/role columns only, with Ray Data's progress bars when
    ``progress``; the driver receives counts, a few example ids and at most the capped ids, so its
    cost does not grow with the store. The training pools are ``read_parquet`` of the store files
    with the split (and, without a split file, the ``supervision``) filter and the column list
    pushed into the scan, file order reshuffled at every pass (seeded by ``run.seed``), roles and
    pseudo labels attached with ``Dataset.join(on=("image_id",))``, then decode + augment tasks.
    ``data.cache_rows`` materializes the joined rows (encoded bytes) once in the object store, with
    the block order reshuffled every pass instead.

    Args:
        cfg: :class:`raysemiseg.config.TrainConfig`.
        uses_boxes: render Bbox-Rect box masks (``Batch.box_masks``) and per-class box bits
            (``Batch.box_bits``) for the method.
        progress: show Ray Data progress bars for the planning passes.

    Raises:
        ValueError: a pool needed by ``data.strong_fraction`` is empty, no validation rows, the
            store's label space differs from ``cfg.label_space``, the split file is malformed
            (:func:`check_split_file`), or the method trains rows on pseudo labels that
            ``data.label_store`` lacks (:func:`check_pseudo_coverage`).
        FileNotFoundError: no split file / label store where configured.
    """
    from ray.data.expressions import col, lit

    from raysemiseg.data.store import open_store
    from raysemiseg.labels import load_label_space

    d = cfg.data
    seed = int(cfg.run.seed)
    store = open_store(d.store)
    space = store.label_space
    want = load_label_space(cfg.label_space)
    if tuple(want.names) != tuple(space.names):
        raise ValueError(
            f"label_space {cfg.label_space!r} ({want.num_classes} classes) differs from the store's "
            f"{space.name!r} ({space.num_classes} classes); set label_space to match the store")
    params = cfg.method.build_params()
    with _progress(progress):
        split = check_split_file(d.split_file, store) if d.split_file is not None else None
        labels = _label_ids(d.label_store, d.label_recipe) if d.label_store else None
        plan = _Rows(cfg, store, split, None, labels)
        cap = _cap_ids(plan.meta(None), d.max_train_rows, seed)
        plan.cap = cap
        counts = _count_by(plan.meta(None), "role")
        if split is not None:
            va_meta = split.filter(expr=col("split") == lit(d.val_split)).select_columns(["image_id"])
        else:
            va_meta = store.dataset(columns=["image_id"], filter_split=d.val_split)
        va_cap = _cap_ids(va_meta, d.max_val_rows, seed)
        val_rows = len(va_cap) if va_cap is not None else va_meta.count()
        if not sum(counts.values()):
            raise ValueError(f"no training rows: split {d.train_split!r} is empty in {d.store}")
        if not val_rows:
            raise ValueError(f"no validation rows: split {d.val_split!r} is empty in {d.store}")
        coverage = {}
        for role in pseudo_label_roles(params):
            n = counts.get(role, 0)
            if n and labels is not None:
                lacking = plan.meta(role).select_columns(["image_id"]).join(
                    labels.select_columns(["image_id"]), join_type="left_anti",
                    num_partitions=_num_partitions(store), on=("image_id",)).materialize()
                coverage[role] = (n, lacking.count(), sorted(r["image_id"] for r in lacking.take(3)))
            else:
                coverage[role] = (n, n, [])
        check_pseudo_coverage(cfg.method.name, coverage, d.label_store)

    quiet_ray_data()  # the training datasets run in the worker group: no bars there
    if d.strong_fraction is None and _pixel_only(cfg.method.name):
        # a method that trains from pixel labels alone (strong_only) gets batches of strong rows only:
        # weak rows in its batches would carry no loss and dilute every step (25 % strong split:
        # 2 of 8 crops per batch would train)
        if not counts.get("strong"):
            raise ValueError(f"method {cfg.method.name!r} trains from pixel labels only, but split "
                             f"{d.train_split!r} of {d.store} has no strong rows")
        pools: dict[str, tuple[str | None, int]] = {"train": ("strong", counts["strong"])}
    elif d.strong_fraction is None:
        pools = {"train": (None, sum(counts.values()))}
    else:
        pools = {"train_strong": ("strong", counts.get("strong", 0)), "train_weak": ("weak", counts.get("weak", 0))}
        k_s = strong_rows_per_batch(d.batch_size, d.strong_fraction)
        for name, k in (("train_strong", k_s), ("train_weak", d.batch_size - k_s)):
            if k > 0 and not pools[name][1]:
                raise ValueError(
                    f"data.strong_fraction={d.strong_fraction} needs {k} {name[6:]} rows per batch, but split "
                    f"{d.train_split!r} has no {name[6:]} rows")
            if k == 0:
                del pools[name]
    # fresh datasets (created after quiet_ray_data: a dataset keeps the context it was made in)
    import ray.data

    split_ds = ray.data.read_parquet(str(d.split_file)).select_columns(["image_id", "split", "role"]) \
        if d.split_file is not None else None
    label_ds = _label_ids(d.label_store, d.label_recipe, check=False) if d.label_store else None
    rows = _Rows(cfg, store, split_ds, cap, label_ds)
    columns = ["image_id", "image", "mask", "labels"] + (["boxes"] if uses_boxes else [])
    aug: dict[str, Any] = dict(crop=d.crop_size, scale_range=tuple(d.scale_range), flip=d.flip,
                               ignore_index=space.ignore_index, num_classes=space.num_classes,
                               uses_boxes=uses_boxes, seed=seed)
    datasets: dict[str, Any] = {}
    for i, (name, (role, _)) in enumerate(pools.items()):
        pool_seed = seed * 1009 + i
        ds = rows.rows(role, columns, shuffle_seed=pool_seed)
        if d.cache_rows:
            ds = _cached(ds, pool_seed)
        datasets[name] = ds.map_batches(augment_batch, fn_kwargs=aug, batch_format="pyarrow", batch_size=16)
    val_where = col("image_id").is_in(va_cap) if va_cap is not None else None
    val = store.dataset(columns=["image_id", "image", "mask", "labels"],
                        filter_split=None if split_ds is not None else d.val_split, where=val_where)
    if split_ds is not None and va_cap is None:
        val = val.join(split_ds.filter(expr=col("split") == lit(d.val_split)).select_columns(["image_id"]),
                       join_type="inner", num_partitions=_num_partitions(store), on=("image_id",))
    datasets["val"] = val.materialize() if d.cache_rows else val
    return DataPlan(datasets=datasets, pool_rows={name: n for name, (_, n) in pools.items()}, val_rows=val_rows,
                    label_space=space, split_names=[n for n in datasets if n != "val"], unequal_split_names=["val"])


def _cached(ds: Any, seed: int) -> Any:
    """``ds`` materialized in the object store (encoded rows), block order reshuffled every pass."""
    from ray.data import RandomSeedConfig

    return ds.materialize().randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


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


def sharded_data_config(plan: DataPlan) -> Any:
    """Ray Train ``DataConfig`` for a plan: the training pools split equally over the workers
    (``streaming_split(equal=True)``: equal steps, no collective hangs), ``plan.unequal_split_names``
    (validation) split without dropping rows (``equal=False``: each row is scored once, by one
    worker; evaluation has no collective until the final metric reduction)."""
    from ray.train import DataConfig

    unequal = list(plan.unequal_split_names)

    class ShardedDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[override]
            out = super().configure({k: v for k, v in datasets.items() if k not in unequal}, world_size,
                                    worker_handles, worker_node_ids, **kwargs)
            hints = worker_node_ids if self._enable_shard_locality else None
            for name in unequal:
                if name not in datasets:
                    continue
                ds = datasets[name].copy(datasets[name])
                if ds.name is None:
                    ds.set_name(name)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][name] = it
            return out

    return ShardedDataConfig(datasets_to_split=list(plan.split_names))


def quiet_ray_data() -> None:
    """No Ray Data progress bars in this process (training logs stay readable)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def strong_rows_per_batch(batch_size: int, strong_fraction: float) -> int:
    """``round(f * B)`` strong rows per batch of ``B`` (half-up), e.g. B=8, f=0.5 -> 4."""
    return int(math.floor(batch_size * strong_fraction + 0.5))


# ----------------------------------------------------------------------------------------------
# Decode + augment (Ray Data map_batches; pure numpy, also used by the plain benchmark loop)
# ----------------------------------------------------------------------------------------------


def _label_dtype(num_classes: int, ignore_index: int) -> type[np.integer]:
    return np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.int32


def _box_pixels(b: dict, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) pixel rectangle of a box dict (rounded, clipped to the image)."""
    x0, y0 = max(int(round(b["x0"])), 0), max(int(round(b["y0"])), 0)
    x1, y1 = min(int(round(b["x1"])), width), min(int(round(b["y1"])), height)
    return y0, y1, x0, x1


def render_boxes(boxes: list[dict] | None, height: int, width: int, ignore_index: int,
                 background: int = 0) -> np.ndarray:
    """Bbox-Rect rendering (Papandreou et al. 2015 Sec. 3.3): class id inside each box, background
    outside; overlapping boxes resolved smallest-on-top. Rows without boxes are all ``ignore_index``.

    Args:
        boxes: dicts with class_id, x0, y0, x1, y1 (pixels, x1/y1 exclusive) or None/empty.

    Returns:
        (height, width) int64 mask.
    """
    if not boxes:
        return np.full((height, width), ignore_index, np.int64)
    out = np.full((height, width), background, np.int64)
    for b in sorted(boxes, key=lambda b: -(b["x1"] - b["x0"]) * (b["y1"] - b["y0"])):
        y0, y1, x0, x1 = _box_pixels(b, height, width)
        out[y0:y1, x0:x1] = b["class_id"]
    return out


def render_box_bits(boxes: list[dict] | None, height: int, width: int, num_classes: int) -> np.ndarray:
    """Per-class box regions, bit-packed (Bbox-EM-Fixed, Papandreou et al. 2015 Sec. 3.3).

    Unlike :func:`render_boxes`, overlapping boxes keep every class: a small box inside a larger one
    leaves the larger box's class set under it.

    Args:
        boxes: dicts with class_id, x0, y0, x1, y1 (pixels, x1/y1 exclusive) or None/empty.
        num_classes: K, the label-space size.

    Returns:
        (ceil(K/8), height, width) uint8: bit ``c % 8`` of byte ``c // 8`` set where the pixel is
        inside a box of class ``c`` (numpy ``packbits(..., bitorder="little")`` layout; unpacked by
        :func:`raysemiseg.methods.wssl.losses.unpack_box_bits`). All zero for rows without boxes.

    Raises:
        ValueError: a box's class_id is outside [0, K).
    """
    out = np.zeros(((num_classes + 7) // 8, height, width), np.uint8)
    for b in boxes or []:
        c = int(b["class_id"])
        if not 0 <= c < num_classes:
            raise ValueError(f"box class_id {c} outside the label space 0..{num_classes - 1}")
        y0, y1, x0, x1 = _box_pixels(b, height, width)
        out[c // 8, y0:y1, x0:x1] |= np.uint8(1 << (c % 8))
    return out


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize (H, W[, 3]) to ``size`` = (h, w); bilinear for images, nearest for label maps."""
    h, w = size
    if arr.ndim == 3:
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))
    mode = "L" if arr.max(initial=0) <= 255 else "I"
    im = Image.fromarray(arr.astype(np.uint8 if mode == "L" else np.int32), mode=mode)
    return np.asarray(im.resize((w, h), Image.NEAREST)).astype(np.int64)


def augment_example(image: np.ndarray, labels: list[np.ndarray], rng: np.random.Generator, *, crop: int,
                    scale_range: tuple[float, float], flip: bool, ignore_index: int
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random scale, random ``crop x crop`` crop (padded), random horizontal flip.

    The same geometric transform applies to the image and every label map.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) int label maps (mask, pseudo, box mask).
        rng: the random generator (scale ~ U(scale_range), crop offset uniform, flip p=0.5).
        crop: output side in pixels; smaller images are padded (image with :data:`PAD_RGB`,
            labels with ``ignore_index``) before cropping, as in DeepLab.

    Returns:
        ((crop, crop, 3) uint8, [(crop, crop) int64 ...]).
    """
    h, w = image.shape[:2]
    s = float(rng.uniform(*scale_range)) if scale_range[0] != scale_range[1] else float(scale_range[0])
    if s != 1.0:
        nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
        image = _resize(image, (nh, nw), nearest=False)
        labels = [_resize(m, (nh, nw), nearest=True) for m in labels]
        h, w = nh, nw
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        padded = np.empty((h + ph, w + pw, 3), np.uint8)
        padded[...] = np.asarray(PAD_RGB, np.uint8)
        padded[:h, :w] = image
        image = padded
        labels = [np.pad(m, ((0, ph), (0, pw)), constant_values=ignore_index) for m in labels]
        h, w = h + ph, w + pw
    y0 = int(rng.integers(0, h - crop + 1))
    x0 = int(rng.integers(0, w - crop + 1))
    image = image[y0:y0 + crop, x0:x0 + crop]
    labels = [m[y0:y0 + crop, x0:x0 + crop] for m in labels]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        labels = [m[:, ::-1] for m in labels]
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in labels]


def augment_batch(batch: pa.Table, *, crop: int, scale_range: tuple[float, float], flip: bool,
                  ignore_index: int, num_classes: int, uses_boxes: bool, seed: int,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Decode and augment store rows into fixed-size arrays (a Ray Data ``map_batches`` UDF).

    Args:
        batch: rows with the image-store columns plus ``role`` (strong|weak) and ``pseudo``
            (label-store PNG or null).
        rng: random generator; default: seeded from ``seed``, the batch's ids and fresh OS
            entropy (augmentation draws differ between visits of the same rows).

    Returns:
        dict of numpy arrays, N = rows: ``image`` (N, crop, crop, 3) uint8; ``mask``, ``pseudo``
        (and ``box_mask`` when ``uses_boxes``) (N, crop, crop) uint8 or int32 with
        ``ignore_index`` void/padding (``mask`` is all void for weak rows, ``box_mask`` for rows
        without boxes); with ``uses_boxes`` also ``box_bits`` (N, ceil(K/8), crop, crop) uint8
        per-class box regions (:func:`render_box_bits`, zero on padding); ``valid`` (N, crop,
        crop) bool, False on the crop's padding (the pixels that are not the image's: no E-step
        label, no loss); ``labels`` (N, K) uint8 multi-hot image-level labels (background column
        set when the space has one at id 0): for strong rows the classes of the CROPPED mask (a
        class cropped out is not present), for weak rows the store's whole-image labels; ``is_strong`` (N,) bool; ``image_id`` (N,) str.
    """
    if rng is None:
        ids_crc = zlib.crc32("".join(batch["image_id"].to_pylist()).encode())
        rng = np.random.default_rng([seed, ids_crc, int.from_bytes(np.random.bytes(4), "little")])
    ldt = _label_dtype(num_classes, ignore_index)
    cols = batch.to_pydict()
    n = batch.num_rows
    out_img = np.empty((n, crop, crop, 3), np.uint8)
    out_mask = np.empty((n, crop, crop), ldt)
    out_pseudo = np.empty((n, crop, crop), ldt)
    out_box = np.empty((n, crop, crop), ldt) if uses_boxes else None
    out_bits = np.zeros((n, (num_classes + 7) // 8, crop, crop), np.uint8) if uses_boxes else None
    out_valid = np.empty((n, crop, crop), bool)
    # the valid-pixel map travels as one more label map: ``inside`` on the image, ignore_index on padding
    inside = 0 if ignore_index != 0 else 1
    multi_hot = np.zeros((n, num_classes), np.uint8)
    is_strong = np.zeros(n, bool)
    for i in range(n):
        image = decode_image(cols["image"][i])
        h, w = image.shape[:2]
        strong = cols["role"][i] == "strong"
        if strong and cols["mask"][i] is None:
            raise ValueError(f"row {cols['image_id'][i]}: role 'strong' but the store holds no pixel mask for it "
                             "(supervision is not 'pixel'); give it role 'weak' or 'none' in data.split_file")
        is_strong[i] = strong
        void = np.full((h, w), ignore_index, np.int64)
        maps = [decode_mask(cols["mask"][i]) if strong else void]
        maps.append(decode_mask(cols["pseudo"][i]) if cols["pseudo"][i] is not None else void)
        n_bits = 0
        if uses_boxes:
            maps.append(render_boxes(cols["boxes"][i], h, w, ignore_index))
            planes = render_box_bits(cols["boxes"][i], h, w, num_classes)
            maps.extend(planes)                                # one uint8 label map per byte
            n_bits = len(planes)
        maps.append(np.full((h, w), inside, np.int64))
        for m in maps:
            if m.shape != (h, w):
                raise ValueError(f"row {cols['image_id'][i]}: label map {m.shape} does not match image {(h, w)}")
        image, maps = augment_example(image, maps, rng, crop=crop, scale_range=scale_range, flip=flip,
                                      ignore_index=ignore_index)
        out_img[i] = image
        out_mask[i] = maps[0]
        out_pseudo[i] = maps[1]
        out_valid[i] = maps[-1] == inside
        if out_box is not None and out_bits is not None:
            out_box[i] = maps[2]
            if n_bits:
                # padding was filled with ignore_index like every label map: no box there
                out_bits[i] = np.stack(maps[3:3 + n_bits]).astype(np.uint8) * out_valid[i]
        if strong:
            # a strong row's labels are the classes of its cropped mask: a class cropped out is absent
            present = np.unique(maps[0])
            multi_hot[i] = multi_hot_labels(present[present != ignore_index].tolist(), num_classes)
        else:
            multi_hot[i] = multi_hot_labels(cols["labels"][i], num_classes)
    out = {"image": out_img, "mask": out_mask, "pseudo": out_pseudo, "valid": out_valid, "labels": multi_hot,
           "is_strong": is_strong, "image_id": np.asarray(cols["image_id"], dtype=object)}
    if out_box is not None:
        out["box_mask"] = out_box
        out["box_bits"] = out_bits
    return out


# ----------------------------------------------------------------------------------------------
# Worker side: endless pools, fixed strong fraction, collate
# ----------------------------------------------------------------------------------------------


class _Pool:
    """Endless row stream over one dataset shard, re-iterated (reshuffled) at each pass end."""

    def __init__(self, name: str, shard: Any, fetch: int, shuffle_buffer: int, seed: int, passes: int = 0) -> None:
        self.name, self.shard, self.fetch, self.shuffle_buffer, self.seed = name, shard, fetch, shuffle_buffer, seed
        self.passes = passes
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._buf: list[dict[str, np.ndarray]] = []
        self._buffered = 0

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            rows = 0
            for b in self.shard.iter_batches(batch_size=self.fetch, batch_format="numpy", prefetch_batches=2,
                                             local_shuffle_buffer_size=self.shuffle_buffer or None,
                                             local_shuffle_seed=self.seed + self.passes if self.shuffle_buffer else None):
                rows += len(b["image_id"])
                yield b
            self.passes += 1
            if rows == 0:
                raise RuntimeError(f"training pool {self.name!r} has no rows on this worker "
                                   "(fewer rows than workers?)")

    def take(self, k: int) -> dict[str, np.ndarray]:
        """The next ``k`` rows (crossing pass boundaries), as a dict of arrays."""
        if self._it is None:
            self._it = self._batches()
        while self._buffered < k:
            b = next(self._it)
            self._buf.append(b)
            self._buffered += len(b["image_id"])
        merged = {key: np.concatenate([b[key] for b in self._buf]) for key in self._buf[0]}
        head = {key: v[:k] for key, v in merged.items()}
        rest = {key: v[k:] for key, v in merged.items()}
        self._buffered -= k
        self._buf = [rest] if self._buffered else []
        return head


class BatchSampler:
    """Mixed mini-batches with a fixed number of strong rows (worker side).

    Args:
        shards: ``{"train": it}`` or ``{"train_strong": it, "train_weak": it}`` (Ray Data
            iterators from ``ray.train.get_dataset_shard``, or any object with ``iter_batches``).
        batch_size: rows per batch ``B``.
        strong_fraction: ``f`` or None (one pool, batches as sampled).
        shuffle_buffer: local shuffle buffer in rows (0 = none).
        seed: shuffle seed (pass ``p`` uses ``seed + p``).
        start_step: steps already trained (a resumed run): each pool's pass counter starts at the
            passes those steps made, ``start_step * rows_per_batch_from_pool // shard_rows[pool]``,
            so a resumed run does not replay the first passes' shuffle seeds.
        shard_rows: rows of each pool on this worker (``pool_rows // num_workers``); needed
            with ``start_step``.
    """

    def __init__(self, shards: dict[str, Any], batch_size: int, strong_fraction: float | None,
                 shuffle_buffer: int = 0, seed: int = 0, start_step: int = 0,
                 shard_rows: dict[str, int] | None = None) -> None:
        self.batch_size = batch_size
        if strong_fraction is None:
            self.quota = {"train": batch_size}
        else:
            k_s = strong_rows_per_batch(batch_size, strong_fraction)
            self.quota = {k: v for k, v in (("train_strong", k_s), ("train_weak", batch_size - k_s)) if v > 0}
        missing = set(self.quota) - set(shards)
        if missing:
            raise ValueError(f"missing dataset shards {sorted(missing)}; have {sorted(shards)}")
        rows = shard_rows or {}
        self.pools = {name: _Pool(name, shards[name], k, shuffle_buffer, seed,
                                  passes=start_step * k // rows[name] if rows.get(name) else 0)
                      for name, k in self.quota.items()}

    def next(self) -> dict[str, np.ndarray]:
        """One batch of ``batch_size`` rows (strong rows first), numpy arrays as in :func:`augment_batch`."""
        parts = [self.pools[name].take(k) for name, k in self.quota.items()]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def steps_per_epoch(pool_rows: dict[str, int], batch_size: int, strong_fraction: float | None,
                    num_workers: int) -> int:
    """Steps in one epoch: one pass over the weak pool (or the only pool), per worker.

    Each worker's shard holds ``rows // num_workers`` rows (equal split); the epoch is
    ``ceil(shard_rows / rows_per_batch_from_that_pool)`` and at least 1.
    """
    if strong_fraction is None:
        return max(1, math.ceil((pool_rows["train"] // num_workers) / batch_size))
    k_s = strong_rows_per_batch(batch_size, strong_fraction)
    if batch_size - k_s > 0:
        return max(1, math.ceil((pool_rows["train_weak"] // num_workers) / (batch_size - k_s)))
    return max(1, math.ceil((pool_rows["train_strong"] // num_workers) / k_s))


def collate(rows: dict[str, np.ndarray], mean: Any, std: Any, device: torch.device | str = "cpu") -> Batch:
    """Numpy rows -> :class:`Batch` on ``device``, images normalised ``(x / 255 - mean) / std``.

    Args:
        rows: arrays as returned by :func:`augment_batch` (without ``valid``: ``Batch.valid`` is None,
            every pixel valid).
        mean, std: per-channel RGB statistics of the backbone, values in [0, 1].
    """
    dev = torch.device(device)
    img = torch.from_numpy(rows["image"]).to(dev, non_blocking=True)
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    images = (img.permute(0, 3, 1, 2).float() / 255.0 - m) / s
    box = rows.get("box_mask")
    bits = rows.get("box_bits")
    valid = rows.get("valid")
    return Batch(
        images=images.contiguous(),
        masks=torch.from_numpy(rows["mask"].astype(np.int64)).to(dev),
        pseudo=torch.from_numpy(rows["pseudo"].astype(np.int64)).to(dev),
        image_labels=torch.from_numpy(rows["labels"].astype(np.float32)).to(dev),
        is_strong=torch.from_numpy(rows["is_strong"].astype(bool)).to(dev),
        box_masks=None if box is None else torch.from_numpy(box.astype(np.int64)).to(dev),
        image_ids=[str(i) for i in rows["image_id"]],
        valid=None if valid is None else torch.from_numpy(np.asarray(valid, bool)).to(dev),
        box_bits=None if bits is None else torch.from_numpy(np.asarray(bits, np.uint8)).to(dev),
    )


# ----------------------------------------------------------------------------------------------
# Validation rows (decoded on the worker: native sizes differ per image)
# ----------------------------------------------------------------------------------------------


def prepare_eval_image(image: np.ndarray, val_size: int | None) -> np.ndarray:
    """Resize (H, W, 3) uint8 so its long side is ``val_size`` (unchanged when None)."""
    if val_size is None:
        return image
    h, w = image.shape[:2]
    s = val_size / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return image
    return _resize(image, (max(int(round(h * s)), 1), max(int(round(w * s)), 1)), nearest=False)


def multi_hot_labels(ids: Any, num_classes: int, background_id: int | None = 0) -> np.ndarray:
    """(K,) float32 multi-hot vector of a row's image-level labels.

    Args:
        ids: the store's ``labels`` value (foreground ids, background excluded; None = none).
        num_classes: K, the label-space size.
        background_id: set to 1 as well (background is present in every image); None = no background.

    Ids outside ``[0, K)`` are ignored (the store validates ids when it is built).
    """
    out = np.zeros(num_classes, np.float32)
    out[[c for c in (ids if ids is not None else []) if 0 <= c < num_classes]] = 1
    if background_id is not None:
        out[background_id] = 1
    return out


def iter_val_rows(rows: Any, rank: int = 0, world: int = 1, fetch: int = 8) -> Iterator[dict[str, Any]]:
    """Decoded validation rows ``i`` with ``i % world == rank`` (every row counted exactly once).

    Args:
        rows: a Ray Data iterator/dataset (``iter_batches``) or a pyarrow Table of store rows.

    Yields:
        {"image_id": str, "image": (H, W, 3) uint8, "mask": (H, W) int64 or None,
        "labels": list[int] of image-level ids (background excluded) when ``rows`` has a ``labels``
        column, else None}.
    """
    if isinstance(rows, pa.Table):
        batches: Any = rows.to_batches(max_chunksize=fetch)
    else:
        batches = rows.iter_batches(batch_size=fetch, batch_format="pyarrow")
    i = 0
    for b in batches:
        cols = b.to_pydict()
        for j in range(len(cols["image_id"])):
            if i % world == rank:
                mask = cols["mask"][j]
                yield {"image_id": cols["image_id"][j], "image": decode_image(cols["image"][j]),
                       "mask": None if mask is None else decode_mask(mask),
                       "labels": cols["labels"][j] if "labels" in cols else None}
            i += 1


def describe_plan(plan: DataPlan) -> str:
    """One line for logs: pools, rows, label space."""
    return json.dumps({"pools": plan.pool_rows, "val_rows": plan.val_rows, "label_space": plan.label_space.name})
