"""Semi/weak splits of an image store, reproducible from a seed, stored as a file (no data copied).

A split file is a Parquet table ``image_id (str), split (str), role (str)`` with schema metadata
``{"raysemiseg.split": <json spec>}``; ``role`` is ``strong`` (use the pixel mask), ``weak``
(image-level labels and boxes only) or ``none`` (unused). ``split`` is the store row's own split.
Rows outside the training split(s) (e.g. ``val``) get ``strong`` when they have a mask (they are
the evaluation ground truth) and ``none`` otherwise.

Kinds (training rows = rows whose split is in ``train_splits``, default ``["train"]``):

* ``i3s-fraction`` (I3S, WSSL / dual-branch): a seeded random ``fraction`` of the training rows
  with masks is strong, the rest weak.
* ``i3s-list``: the image ids listed in a file (one per line; e.g. VOC train's 1,464) are strong,
  every other training row weak.
* ``i3s-per-class`` (DecoupledNet, N = 5/10/25): classes in order of increasing frequency; for
  each, seeded-random training rows with masks that contain the class are made strong until N
  strong rows contain it (or the candidates run out); the rest are weak.
* ``c3s`` split-sets 1-4 (Xiao et al. 2018, Table 2; DESIGN.md section 4): classes are split into
  strong and weak sets; a training row whose classes are all strong keeps its mask (strong); a row
  with any weak class is ``mixed`` -> role given by ``mixed`` (``weak``: image-level labels only,
  the default and the paper's rule; ``none``: dropped). Rows without any foreground label get
  ``none`` unless ``keep_empty``. Split-set 4 needs a space with COCO's 60 non-VOC classes
  (e.g. ``coco80``): strong = those 60, weak = the 20 VOC classes.

Every row of the store appears in the split file exactly once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysemiseg.data.store import ImageStore, open_store
from raysemiseg.labels import COCO_TO_VOC_RENAME, VOC_CLASSES, LabelSpace

SPLIT_SCHEMA = pa.schema([("image_id", pa.string()), ("split", pa.string()), ("role", pa.string())])
ROLES = ("strong", "weak", "none")
KINDS = ("i3s-fraction", "i3s-list", "i3s-per-class", "c3s")

#: C3S strong classes per split-set (VOC names); weak = the other VOC classes.
C3S_STRONG: dict[int, tuple[str, ...]] = {
    1: ("bicycle", "boat", "bus", "car", "cat", "chair", "cow", "diningtable", "person", "tvmonitor"),
    3: ("chair", "cow", "dog", "motorbike", "person", "train"),
}
C3S_STRONG[2] = tuple(c for c in VOC_CLASSES[1:] if c not in C3S_STRONG[1])


@dataclass(frozen=True)
class SplitSpec:
    """What to split and how (stored as JSON in the split file's metadata).

    Attributes:
        kind: one of :data:`KINDS`.
        seed: RNG seed (numpy ``default_rng``).
        fraction: ``i3s-fraction``: share of masked training rows made strong, in [0, 1] (0 = weak-only:
            every training row keeps its image labels and boxes only, WSSL's "Weak" rows).
        strong_list: ``i3s-list``: path of the id list.
        per_class: ``i3s-per-class``: N strong rows per class.
        split_set: ``c3s``: 1..4.
        mixed: ``c3s``: role of rows with any weak class, ``weak`` or ``none``.
        keep_empty: ``c3s``: rows with no foreground label stay strong (else ``none``).
        train_splits: store splits that are training rows.
    """

    kind: str
    seed: int = 0
    fraction: float | None = None
    strong_list: str | None = None
    per_class: int | None = None
    split_set: int | None = None
    mixed: str = "weak"
    keep_empty: bool = False
    train_splits: tuple[str, ...] = ("train",)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown split kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind == "i3s-fraction" and not (self.fraction is not None and 0 <= self.fraction <= 1):
            raise ValueError(f"i3s-fraction needs 0 <= fraction <= 1, got {self.fraction}")
        if self.kind == "i3s-list" and not self.strong_list:
            raise ValueError("i3s-list needs strong_list (a file of image ids)")
        if self.kind == "i3s-per-class" and not (self.per_class and self.per_class > 0):
            raise ValueError(f"i3s-per-class needs per_class > 0, got {self.per_class}")
        if self.kind == "c3s" and self.split_set not in (1, 2, 3, 4):
            raise ValueError(f"c3s needs split_set in 1..4, got {self.split_set}")
        if self.mixed not in ("weak", "none"):
            raise ValueError(f"mixed must be 'weak' or 'none', got {self.mixed!r}")


def c3s_classes(split_set: int, space: LabelSpace) -> tuple[set[int], set[int]]:
    """(strong ids, weak ids) of a C3S split-set in ``space`` (background in neither).

    Raises:
        ValueError: a class of the split-set is missing from ``space`` (e.g. split-set 4 on voc21).
    """
    def voc_name(n: str) -> str:
        return COCO_TO_VOC_RENAME.get(n, n)

    fg = [i for i in space.foreground_ids]
    if split_set == 4:
        weak = {i for i in fg if voc_name(space.names[i]) in VOC_CLASSES}
        strong = set(fg) - weak
        if len(strong) < 60:
            raise ValueError(f"C3S split-set 4 needs COCO's 60 non-VOC classes as strong classes; label space "
                             f"{space.name!r} has {len(strong)}: build the store with --label-space coco80")
        return strong, weak
    by_voc = {voc_name(space.names[i]): i for i in fg}
    missing = [c for c in VOC_CLASSES[1:] if c not in by_voc]
    if missing:
        raise ValueError(f"C3S split-set {split_set} needs the 20 VOC classes; label space {space.name!r} "
                         f"lacks {missing}")
    strong = {by_voc[c] for c in C3S_STRONG[split_set]}
    weak = {by_voc[c] for c in VOC_CLASSES[1:]} - strong
    return strong, weak


def make_split(store: ImageStore | str | Path, spec: SplitSpec) -> pa.Table:
    """Assign a role to every store row (see the module docstring).

    Returns:
        ``SPLIT_SCHEMA`` table in store order, with ``raysemiseg.split`` metadata.

    Raises:
        ValueError: bad spec, unknown ids in a strong list, or a space that cannot hold the split-set.
    """
    st = store if isinstance(store, ImageStore) else open_store(store)
    t = st.read_table(columns=["image_id", "split", "supervision", "labels"])
    ids = t.column("image_id").to_pylist()
    splits = t.column("split").to_pylist()
    has_mask = [s == "pixel" for s in t.column("supervision").to_pylist()]
    labels = [set(x or []) for x in t.column("labels").to_pylist()]
    train = np.array([s in spec.train_splits for s in splits], dtype=bool)
    rng = np.random.default_rng(spec.seed)
    roles = np.where(np.array(has_mask), "strong", "none").astype(object)  # non-training rows
    tr_idx = np.flatnonzero(train)
    cand = np.array([i for i in tr_idx if has_mask[i]], dtype=np.int64)
    strong = np.zeros(len(ids), dtype=bool)
    if spec.kind == "i3s-fraction":
        k = int(round(spec.fraction * len(cand)))
        strong[rng.permutation(cand)[:k]] = True
    elif spec.kind == "i3s-list":
        wanted = [ln.strip() for ln in Path(spec.strong_list).read_text().splitlines() if ln.strip()]
        pos = {iid: i for i, iid in enumerate(ids)}
        unknown = [w for w in wanted if w not in pos]
        if unknown:
            raise ValueError(f"{spec.strong_list}: {len(unknown)} image ids not in the store, e.g. {unknown[:3]}")
        for w in wanted:
            if train[pos[w]] and has_mask[pos[w]]:
                strong[pos[w]] = True
    elif spec.kind == "i3s-per-class":
        order = rng.permutation(cand)
        space = st.label_space
        freq = {c: sum(1 for i in cand if c in labels[i]) for c in space.foreground_ids}
        for c in sorted(freq, key=lambda c: (freq[c], c)):
            have = sum(1 for i in cand if strong[i] and c in labels[i])
            for i in order:
                if have >= spec.per_class:
                    break
                if not strong[i] and c in labels[i]:
                    strong[i] = True
                    have += 1
    if spec.kind == "c3s":
        s_ids, w_ids = c3s_classes(spec.split_set, st.label_space)
        for i in tr_idx:
            fg = labels[i] - {st.label_space.background_id}
            if not fg:
                roles[i] = "strong" if (spec.keep_empty and has_mask[i]) else "none"
            elif fg & w_ids:
                roles[i] = spec.mixed
            else:
                roles[i] = "strong" if has_mask[i] else "weak"
    else:
        for i in tr_idx:
            roles[i] = "strong" if strong[i] else "weak"
    meta = {b"raysemiseg.split": json.dumps(asdict(spec)).encode()}
    return pa.Table.from_pydict({"image_id": ids, "split": splits, "role": [str(r) for r in roles]},
                                schema=SPLIT_SCHEMA.with_metadata(meta))


def write_split(table: pa.Table, path: str | Path) -> Path:
    """Write a split table (Parquet, metadata kept)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, p)
    return p


def read_split(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """``(table, spec_dict)`` of a split file.

    Raises:
        ValueError: the file is not a split file.
    """
    t = pq.read_table(path)
    meta = t.schema.metadata or {}
    if b"raysemiseg.split" not in meta:
        raise ValueError(f"{path} is not a split file (no raysemiseg.split metadata); write one with "
                         f"`raysemiseg data split`")
    return t, json.loads(meta[b"raysemiseg.split"])


def split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """{split: {role: n}} for printing."""
    out: dict[str, dict[str, int]] = {}
    for s, r in zip(table.column("split").to_pylist(), table.column("role").to_pylist()):
        out.setdefault(s, {k: 0 for k in ROLES})[r] += 1
    return out


def format_split_counts(table: pa.Table) -> str:
    """Counts table: one line per split with strong/weak/none."""
    lines = [f"{'split':<12} {'strong':>7} {'weak':>7} {'none':>7}"]
    for s, c in sorted(split_counts(table).items()):
        lines.append(f"{s:<12} {c['strong']:>7} {c['weak']:>7} {c['none']:>7}")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``split`` to the ``data`` sub-commands."""
    p = sub.add_parser("split", help="write a semi/weak split file (I3S fraction/list/per-class, C3S 1-4)")
    p.add_argument("store")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--i3s-fraction", type=float, metavar="F", help="share of masked training rows that are strong")
    g.add_argument("--i3s-list", metavar="FILE", help="file of image ids that are strong")
    g.add_argument("--i3s-per-class", type=int, metavar="N", help="N strong images per class (5/10/25)")
    g.add_argument("--c3s", type=int, choices=(1, 2, 3, 4), metavar="SET", help="C3S split-set 1..4")
    p.add_argument("--mixed", choices=("weak", "none"), default="weak",
                   help="c3s: role of images holding any weak class (default weak: image labels only)")
    p.add_argument("--keep-empty", action="store_true", help="c3s: keep images without foreground labels as strong")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-splits", default="train", help="comma-separated store splits used for training")
    p.add_argument("--out", default=None, help="split file (default STORE/splits/<kind>.parquet)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.i3s_fraction is not None:
        spec, tag = SplitSpec("i3s-fraction", fraction=args.i3s_fraction), f"i3s-fraction-{args.i3s_fraction:g}"
    elif args.i3s_list is not None:
        spec, tag = SplitSpec("i3s-list", strong_list=args.i3s_list), f"i3s-list-{Path(args.i3s_list).stem}"
    elif args.i3s_per_class is not None:
        spec, tag = SplitSpec("i3s-per-class", per_class=args.i3s_per_class), f"i3s-per-class-{args.i3s_per_class}"
    else:
        spec, tag = SplitSpec("c3s", split_set=args.c3s, mixed=args.mixed, keep_empty=args.keep_empty), f"c3s-{args.c3s}"
    spec = SplitSpec(**{**asdict(spec), "seed": args.seed, "train_splits": tuple(args.train_splits.split(","))})
    table = make_split(args.store, spec)
    out = Path(args.out) if args.out else Path(args.store) / "splits" / f"{tag}-seed{args.seed}.parquet"
    write_split(table, out)
    print(f"split {tag} (seed {args.seed}) -> {out}")
    print(format_split_counts(table))
    return 0
