"""The Parquet image store: one validated row per image, written through Ray Data.

Layout (fixed, see ``schema.py``)::

    STORE/images/part-00000000.parquet ... IMAGE_STORE_SCHEMA, rows in build order
    STORE/quarantine/part-00000.parquet   QUARANTINE_SCHEMA, rows that failed validation
    STORE/store.json                      schema_version, label_space, sources, counts

Build (:func:`build_store`):

1. the readers list one *record* per source item on the driver (paths + annotations, no pixels);
   records are ordered by source (in the given order) then by image id, and get a sequence
   number; a record whose ``image_id`` was already listed is quarantined as a duplicate here;
2. duplicates by content, from a cheap first Ray Data pass over the paths only (file bytes are
   hashed, not decoded): a row whose image file bytes (SHA-256) equal those of an earlier row is
   quarantined as ``"duplicate: ... identical image bytes to <first image_id>"`` (first in listing
   order wins). Only the small ``(seq, sha256)`` table is materialized; the duplicated hashes are
   found with a Ray Data ``groupby("sha256").count()``, so the driver only sees the duplicates;
3. ``ray.data.from_items(records)`` -> ``map_batches(_build_rows)``: each task fully decodes
   the image, builds the mask in the target label space, validates (missing or corrupt file,
   mask size, class ids, empty image-level label set) and encodes the row, or gives the
   quarantine reason; kept rows stream straight to ``write_parquet`` (deterministic file names
   ``part-<task:08>.parquet``, sorting right past 99,999 files, and ``preserve_order``): nothing
   is pinned in the object store;
4. the quarantine table: the listing and duplicate reasons are known on the driver; the rows the
   build pass refused are the listed rows missing from ``images/`` (an ``image_id`` column read),
   re-validated in a small second Ray pass for their reasons. The store folder's ``images/`` and
   ``quarantine/`` are replaced on rebuild, so a rerun over the same inputs gives the same rows
   and files.

Invariant, checked before ``store.json`` is written: rows read = rows written + rows quarantined
(duplicates included in the quarantined rows, also counted apart in ``store.json``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysemiseg.data.schema import (
    IMAGE_STORE_SCHEMA,
    QUARANTINE_SCHEMA,
    STORE_SCHEMA_VERSION,
    encode_mask,
)
from raysemiseg.data.validate import RowError, load_image, reason_category
from raysemiseg.labels import LabelSpace, load_label_space

#: columns added to the image-row schema while building (dropped before writing)
_EXTRA = [("seq", pa.int64()), ("sha256", pa.string()), ("q_path", pa.string()),
          ("q_stage", pa.string()), ("q_reason", pa.string())]
_BUILD_SCHEMA = pa.schema(list(IMAGE_STORE_SCHEMA) + [pa.field(n, t) for n, t in _EXTRA])

ROWS_PER_FILE = 64


# ------------------------------------------------------------------------------------------
# label spaces in store.json
def space_to_manifest(space: LabelSpace) -> dict[str, Any]:
    """``LabelSpace.to_dict()`` plus its ``name`` (the form kept in ``store.json``)."""
    return {"name": space.name, **space.to_dict()}


def space_from_manifest(d: dict[str, Any]) -> LabelSpace:
    """Inverse of :func:`space_to_manifest`."""
    return LabelSpace(name=d["name"], names=tuple(d["names"]), palette=np.asarray(d["palette"]),
                      ignore_index=int(d.get("ignore_index", 255)), background=d.get("background"))


# ------------------------------------------------------------------------------------------
# sources
@dataclass(frozen=True)
class Source:
    """One input of a build.

    Attributes:
        kind: ``"coco"`` (``paths = (annotations_json, images_dir)``), ``"voc"`` (``(root,)``),
            or ``"folders"`` (``(root_or_csv,)``).
        paths: see ``kind``.
        options: reader keyword options (e.g. ``{"lists": ["train", "val"]}`` for VOC).
    """

    kind: str
    paths: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "paths": list(self.paths), "options": dict(self.options)}


def list_records(source: Source, space: LabelSpace) -> list[dict[str, Any]]:
    """The build records of one source (see the readers' ``read_*_records``).

    Raises:
        ValueError: unknown source kind.
    """
    if source.kind == "coco":
        from raysemiseg.data.coco import coco_source, read_coco_records

        return read_coco_records(coco_source(*source.paths), space)
    if source.kind == "voc":
        from raysemiseg.data.voc import read_voc_records

        return read_voc_records(source.paths[0], space, **source.options)
    if source.kind == "folders":
        from raysemiseg.data.folders import read_folder_records

        return read_folder_records(source.paths[0], space, **source.options)
    raise ValueError(f"unknown source kind {source.kind!r}; valid: coco, voc, folders")


def _row_content(record: dict[str, Any], height: int, width: int, space: LabelSpace
                 ) -> tuple[np.ndarray | None, list[int], list[dict[str, float]]]:
    kind = record["kind"]
    if kind == "coco":
        from raysemiseg.data.coco import coco_row

        return coco_row(record, height, width, space)
    if kind == "voc":
        from raysemiseg.data.voc import voc_row

        return voc_row(record, height, width, space)
    if kind == "folders":
        from raysemiseg.data.folders import folder_row

        return folder_row(record, height, width, space)
    raise ValueError(f"unknown record kind {kind!r}")


def build_row(record: dict[str, Any], space: LabelSpace) -> dict[str, Any]:
    """Validate and encode one record into a build row (``_BUILD_SCHEMA`` as a dict).

    Never raises for bad data: the problem goes to ``q_reason`` (empty when the row is good).
    """
    row: dict[str, Any] = {k: record[k] for k in ("image_id", "source", "split", "supervision")}
    row["provenance"] = record.get("provenance") or None
    row.update(seq=record["seq"], image=None, image_format=None, mask=None, labels=[], boxes=[],
               height=None, width=None, sha256=None, q_path=record.get("image_path", ""), q_stage="",
               q_reason="")
    if record.get("q_reason"):  # quarantined before the build (listed twice, duplicate bytes)
        row.update(q_reason=record["q_reason"], q_path=record.get("image_path", ""),
                   q_stage=record.get("q_stage") or "read")
        return row
    try:
        data, fmt, h, w, sha = load_image(record["image_path"])
        mask, labels, boxes = _row_content(record, h, w, space)
        if mask is not None:
            from raysemiseg.data.validate import check_mask

            check_mask(mask, h, w, space, record.get("mask_path") or None)
        if record["supervision"] == "image" and not labels:
            raise RowError(f"empty label set: image-level row {record['image_id']} has no labels in "
                           f"label space {space.name!r}; label it or remove it", record["image_path"])
        row.update(image=data, image_format=fmt, height=h, width=w, sha256=sha,
                   mask=None if mask is None else encode_mask(mask),
                   labels=[int(x) for x in labels],
                   boxes=[{k: (int(b[k]) if k == "class_id" else float(b[k]))
                           for k in ("class_id", "x0", "y0", "x1", "y1")} for b in boxes])
    except RowError as e:
        row.update(q_reason=e.reason, q_path=e.path or record.get("image_path", ""), q_stage="validate")
    return row


def _build_rows(batch: pa.Table, space: dict[str, Any]) -> pa.Table:
    """Ray Data batch function: records (pyarrow) -> build rows (``_BUILD_SCHEMA``)."""
    ls = space_from_manifest(space)
    rows = [build_row(r, ls) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=_BUILD_SCHEMA)


def _keep_built(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: build rows that passed validation, as ``IMAGE_STORE_SCHEMA`` rows."""
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("q_reason"), "")).select(IMAGE_STORE_SCHEMA.names).cast(IMAGE_STORE_SCHEMA)


def _hash_files(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: ``(seq, sha256)`` of each record's image file bytes.

    ``sha256`` is null for records already quarantined at listing time and for files that cannot
    be read (the build pass names that problem).
    """
    import hashlib

    shas = []
    for path, reason in zip(batch.column("image_path").to_pylist(), batch.column("q_reason").to_pylist()):
        sha = None
        if not reason:
            try:
                with open(path, "rb") as f:
                    sha = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                sha = None
        shas.append(sha)
    return pa.table({"seq": batch.column("seq"), "sha256": pa.array(shas, pa.string())})


ROWS_PER_HASH_PARTITION = 4096


def hash_partitions(num_rows: int) -> int:
    """Hash partitions for a Ray Data groupby or join over ``num_rows`` store rows: one per 4,096 rows
    (~0.4 GB of encoded images), clamped to 1..10,000. Ray's default (200) costs seconds of aggregator
    start-up on a small store; on a 10M-image store this gives 2,441.

    Args:
        num_rows: rows on the larger side (>= 0).

    Returns:
        int in [1, 10000].
    """
    return max(1, min(10_000, int(num_rows) // ROWS_PER_HASH_PARTITION))


def find_duplicates(hashes: Any, image_ids: Sequence[str]) -> dict[int, str]:
    """Records whose image bytes repeat those of an earlier record (the first in ``seq`` wins).

    Args:
        hashes: a ``ray.data.Dataset`` with columns ``seq`` (int, the record's index in
            ``image_ids``) and ``sha256`` (hex str or null), e.g. from :func:`_hash_files`.
        image_ids: image id of each record, by ``seq``.

    Returns:
        ``{seq: quarantine reason}`` of every later copy. Only duplicated hashes reach the driver:
        they are found with ``groupby("sha256").count()`` on Ray.
    """
    from ray.data.expressions import col, lit

    hashed = hashes.filter(expr=col("sha256").is_not_null())
    counts = hashed.groupby("sha256", num_partitions=hash_partitions(len(image_ids))).count()
    count_col = [c for c in counts.schema().names if c != "sha256"][0]
    repeated = [r["sha256"] for r in counts.filter(expr=col(count_col) > lit(1)).take_all()]
    if not repeated:
        return {}
    rows = sorted((r["seq"], r["sha256"]) for r in hashed.filter(expr=col("sha256").is_in(repeated)).take_all())
    first: dict[str, str] = {}
    out: dict[int, str] = {}
    for seq, sha in rows:
        if sha in first:
            out[int(seq)] = (f"duplicate: {image_ids[seq]} has identical image bytes to {first[sha]} "
                             f"(sha256 {sha[:12]}); the first is kept")
        else:
            first[sha] = image_ids[seq]
    return out


def part_name(index: int) -> str:
    """File name of image-store part ``index``: ``part-00000042.parquet`` (sorts in index order)."""
    return f"part-{index:08d}.parquet"


class _PartNames:
    """Deterministic Parquet file names ``part-<task:08>.parquet`` (see Ray's FilenameProvider).

    Eight digits: names sort in task order up to 10**8 files (``ROWS_PER_FILE`` rows each).
    """

    def __new__(cls):  # built lazily so importing this module does not import ray.data
        from ray.data.datasource import FilenameProvider

        class PartNames(FilenameProvider):
            def __init__(self) -> None:
                super().__init__(file_format="parquet")

            def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
                return part_name(task_index)

        return PartNames()


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_store` did: counts and wall time in seconds (Ray start-up excluded)."""

    path: Path
    read: int
    written: int
    quarantined: int
    seconds: float


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        extra = {p.name for p in out.iterdir()} - {"images", "quarantine", "store.json", "splits"}
        if extra and not (out / "store.json").exists():
            raise ValueError(f"--out {out} is a non-empty folder that is not an image store "
                             f"(holds {sorted(extra)[:5]}); choose an empty or new folder")
        for sub in ("images", "quarantine"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "store.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build_store(sources: Sequence[Source], label_space: LabelSpace | str, out: str | Path,
                rows_per_file: int = ROWS_PER_FILE, progress: bool = True) -> BuildResult:
    """Build (or rebuild, replacing) the image store ``out`` from ``sources``.

    Args:
        sources: inputs in priority order (an image found twice keeps its first occurrence).
        label_space: the target space (a ``LabelSpace``, a built-in name or a YAML path).
        out: store folder; created, or replaced if it already holds a store.
        rows_per_file: rows per Parquet file (and per Ray Data block).
        progress: show tqdm bars on the driver.

    Returns:
        :class:`BuildResult` with rows read/written/quarantined.

    Raises:
        ValueError: no sources, ``out`` is a non-store folder, or the count invariant fails.
        FileNotFoundError: a source path does not exist (from the readers).
    """
    import ray
    from ray.data import DataContext
    from tqdm import tqdm

    space = load_label_space(label_space) if not isinstance(label_space, LabelSpace) else label_space
    if not sources:
        raise ValueError("no sources given; pass --coco, --voc, --folders or --sample")
    out = Path(out)
    records: list[dict[str, Any]] = []
    per_source: list[dict[str, Any]] = []
    for src in tqdm(sources, desc="list sources", unit="src", disable=not progress):
        recs = list_records(src, space)
        per_source.append({**src.to_dict(), "rows_read": len(recs)})
        records.extend(recs)
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        r["seq"] = i
        first = seen.setdefault(r["image_id"], i)
        r["q_reason"] = "" if first == i else (
            f"duplicate: image_id {r['image_id']} listed again (by {r['source']}); the first "
            f"occurrence (from {records[first]['source']}) is kept")
        r["q_stage"] = "read" if r["q_reason"] else ""
        for k in ("mask_path", "payload", "provenance"):
            r.setdefault(k, "")
    del seen
    _prepare_out(out)
    ctx = DataContext.get_current()
    old_order, old_bars = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    try:
        from raysemiseg.runtime import ensure_ray

        ensure_ray(log_to_driver=False)  # a cluster (ray job submit), else a fresh local instance
        t0 = time.perf_counter()  # build time, Ray start-up excluded
        n_blocks = max(1, math.ceil(len(records) / rows_per_file))
        # pass 1: hash the image files' bytes (no decode); only (seq, sha256) is materialized
        paths = [{"seq": r["seq"], "image_path": r.get("image_path", ""), "q_reason": r["q_reason"]} for r in records]
        hashes = (ray.data.from_items(paths, override_num_blocks=n_blocks)
                  .map_batches(_hash_files, batch_format="pyarrow", batch_size=None).materialize())
        del paths
        dups = find_duplicates(hashes, [r["image_id"] for r in records])
        del hashes
        for seq, reason in dups.items():
            records[seq].update(q_reason=reason, q_stage="validate")
        # pass 2: decode, validate, encode; the kept rows stream to Parquet
        space_kw = {"space": space_to_manifest(space)}
        (ray.data.from_items(records, override_num_blocks=n_blocks)
         .map_batches(_build_rows, fn_kwargs=space_kw, batch_format="pyarrow", batch_size=None)
         .map_batches(_keep_built, batch_format="pyarrow", batch_size=None)
         .write_parquet(str(out / "images"), filename_provider=_PartNames(), mode=ray.data.SaveMode.OVERWRITE))
        # pass 3: the reasons of the rows pass 2 refused (listed rows missing from images/)
        files = sorted((out / "images").glob("*.parquet"))
        written_ids = set(pq.ParquetDataset(files).read(columns=["image_id"]).column("image_id").to_pylist()) \
            if files else set()
        refused = [r for r in records if not r["q_reason"] and r["image_id"] not in written_ids]
        refused_q: list[dict[str, Any]] = []
        if refused:
            refused_q = (ray.data.from_items(refused, override_num_blocks=max(1, math.ceil(len(refused) / rows_per_file)))
                         .map_batches(_build_rows, fn_kwargs=space_kw, batch_format="pyarrow", batch_size=None)
                         .select_columns(["seq", "image_id", "source", "q_path", "q_stage", "q_reason"]).take_all())
        written = len(written_ids)
        del written_ids
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.enable_progress_bars = old_bars
    q_rows = []
    listed = ({"seq": r["seq"], "image_id": r["image_id"], "source": r["source"], "q_path": r.get("image_path", ""),
               "q_stage": r["q_stage"], "q_reason": r["q_reason"]} for r in records if r["q_reason"])
    for row in sorted([*listed, *refused_q], key=lambda row: row["seq"]):
        if not row["q_reason"]:
            raise ValueError(f"store {out}: row {row['image_id']} was not written, yet validates on a second "
                             "pass (a file changed during the build?); rebuild")
        q_rows.append({"image_id": row["image_id"], "source": row["source"], "path": row["q_path"] or "",
                       "stage": row["q_stage"] or "validate", "reason": row["q_reason"]})
    (out / "quarantine").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(q_rows, schema=QUARANTINE_SCHEMA),
                   out / "quarantine" / "part-00000.parquet")
    read, quarantined = len(records), len(q_rows)
    if read != written + quarantined:
        raise ValueError(f"store {out}: rows read {read} != written {written} + quarantined {quarantined}")
    manifest = {
        "schema_version": STORE_SCHEMA_VERSION,
        "label_space": space_to_manifest(space),
        "sources": per_source,
        "counts": {"read": read, "written": written, "quarantined": quarantined},
        "duplicates": {"by_content": len(dups), "by_image_id": sum(1 for r in q_rows if r["stage"] == "read"
                                                                    and r["reason"].startswith("duplicate:"))},
    }
    (out / "store.json").write_text(json.dumps(manifest, indent=1))
    return BuildResult(out, read, written, quarantined, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------
class ImageStore:
    """A built image store (read side).

    Attributes:
        path: the store folder.
        manifest: the parsed ``store.json``.
        label_space: the store's :class:`LabelSpace` (mask ids and ``labels`` refer to it).
        images_dir: ``path / "images"`` (Parquet files, ``IMAGE_STORE_SCHEMA``).
        quarantine_dir: ``path / "quarantine"``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / "store.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{self.path} is not an image store (no store.json); build one with "
                                    f"`raysemiseg data build ... --out {self.path}`")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("schema_version") != STORE_SCHEMA_VERSION:
            raise ValueError(f"{mf}: schema_version {self.manifest.get('schema_version')} != "
                             f"{STORE_SCHEMA_VERSION}; rebuild the store")
        self.label_space: LabelSpace = space_from_manifest(self.manifest["label_space"])
        self.images_dir = self.path / "images"
        self.quarantine_dir = self.path / "quarantine"

    @property
    def files(self) -> list[Path]:
        """The image Parquet files in row order."""
        return sorted(self.images_dir.glob("*.parquet"))

    def __len__(self) -> int:
        return int(self.manifest["counts"]["written"])

    def read_table(self, columns: Sequence[str] | None = None,
                   filter_split: str | Iterable[str] | None = None) -> pa.Table:
        """All rows (in store order) as one table, on this process: for small stores and tools.

        Training and evaluation at scale use :meth:`dataset` (Ray Data, streamed).

        Args:
            columns: subset of ``IMAGE_STORE_SCHEMA`` names (default all).
            filter_split: keep rows whose ``split`` equals this value (or is in these values);
                pushed down into the Parquet scan (``pq.read_table(filters=...)``: row groups of
                other splits are skipped by their statistics, the rest filtered while reading).
        """
        cols = list(columns) if columns is not None else IMAGE_STORE_SCHEMA.names
        files = self.files
        if not files:
            return IMAGE_STORE_SCHEMA.empty_table().select(cols)
        filters = None
        if filter_split is not None:
            want = [filter_split] if isinstance(filter_split, str) else sorted(set(filter_split))
            filters = [("split", "in", want)]
        return pq.read_table([str(p) for p in files], columns=cols, filters=filters, schema=IMAGE_STORE_SCHEMA)

    def read_quarantine(self) -> pa.Table:
        """The quarantine table (``QUARANTINE_SCHEMA``)."""
        parts = [pq.read_table(p, schema=QUARANTINE_SCHEMA) for p in sorted(self.quarantine_dir.glob("*.parquet"))]
        return pa.concat_tables(parts) if parts else QUARANTINE_SCHEMA.empty_table()

    def dataset(self, columns: Sequence[str] | None = None, filter_split: str | Iterable[str] | None = None,
                shuffle_seed: int | None = None, where: Any = None):
        """The rows as a streamed ``ray.data.Dataset`` (store order unless shuffled).

        Column projection and the row filters are pushed down into Ray Data's Parquet scan
        (``select_columns`` / ``filter(expr=...)`` right after ``read_parquet``), so the driver
        reads nothing and the read tasks decode only the columns and rows asked for.

        Args:
            columns: subset of ``IMAGE_STORE_SCHEMA`` names (default all).
            filter_split: keep rows whose split is this value (or in these values).
            shuffle_seed: randomise the file order at every execution (every pass over the
                dataset) with ``read_parquet(shuffle=FileShuffleConfig(seed, reseed_after_execution))``:
                pass ``e`` of a run seeded ``s`` gets its own reproducible file order. None = store order.
            where: an extra Ray Data predicate expression (``ray.data.expressions``), e.g.
                ``col("supervision") == lit("pixel")``, also pushed down.
        """
        import ray
        from ray.data import FileShuffleConfig
        from ray.data.expressions import col, lit

        shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=int(shuffle_seed),
                                                                      reseed_after_execution=True)
        ds = ray.data.read_parquet([str(p) for p in self.files], shuffle=shuffle, schema=IMAGE_STORE_SCHEMA)
        pred = None
        if filter_split is not None:
            want = sorted({filter_split} if isinstance(filter_split, str) else set(filter_split))
            pred = col("split") == lit(want[0]) if len(want) == 1 else col("split").is_in(want)
        if where is not None:
            pred = where if pred is None else pred & where
        if pred is not None:
            ds = ds.filter(expr=pred)
        if columns is not None:
            ds = ds.select_columns(list(columns))
        return ds


def open_store(path: str | Path) -> ImageStore:
    """Open a built image store (see :class:`ImageStore`).

    Raises:
        FileNotFoundError: no ``store.json`` in ``path``.
        ValueError: the store was written with another schema version.
    """
    return ImageStore(path)


# ------------------------------------------------------------------------------------------
def summarize(store: ImageStore) -> dict[str, Any]:
    """Counts for ``raysemiseg data summary``.

    Returns:
        dict with ``counts`` (read/written/quarantined), ``splits`` {split: n},
        ``supervision`` {kind: n}, ``split_supervision`` {split: {kind: n}}, ``class_images``
        {class name: number of images whose image-level labels hold it} (every non-background
        class of the space, zero included), ``class_masks`` {class name: number of masks holding
        it} (every class of the space in id order, background and zeros included), ``masks``
        (rows with a mask), ``void`` {``masks``: masks holding void pixels, ``fraction``: void
        pixels / all mask pixels, 0..1}, ``boxes`` {``boxes``: total, ``rows``: rows with boxes,
        ``derived_rows``: those whose provenance says the boxes were derived from the mask},
        ``quarantine`` {reason category: n}.
    """
    from raysemiseg.data.schema import decode_mask

    t = store.read_table(columns=["split", "supervision", "labels", "mask", "boxes", "provenance"])
    space = store.label_space
    splits: dict[str, int] = {}
    sup: dict[str, int] = {}
    split_sup: dict[str, dict[str, int]] = {}
    for s, k in zip(t.column("split").to_pylist(), t.column("supervision").to_pylist()):
        splits[s] = splits.get(s, 0) + 1
        sup[k] = sup.get(k, 0) + 1
        split_sup.setdefault(s, {})[k] = split_sup.setdefault(s, {}).get(k, 0) + 1
    counts = np.zeros(space.num_classes, dtype=np.int64)
    for labels in t.column("labels").to_pylist():
        if labels:
            counts[np.unique(np.asarray(labels, dtype=np.int64))] += 1
    mcounts = np.zeros(space.num_classes, dtype=np.int64)
    n_masks = void_masks = void_px = all_px = 0
    for mb in t.column("mask").to_pylist():
        if mb is None:
            continue
        m = decode_mask(mb)
        u = np.unique(m)
        mcounts[u[u < space.num_classes]] += 1
        n_void = int((m == space.ignore_index).sum())
        n_masks += 1
        void_masks += n_void > 0
        void_px += n_void
        all_px += m.size
    n_boxes = box_rows = derived_rows = 0
    for bx, prov in zip(t.column("boxes").to_pylist(), t.column("provenance").to_pylist()):
        n_boxes += len(bx or [])
        box_rows += bool(bx)
        derived_rows += bool(bx) and bool(prov) and "derived-from-mask" in json.loads(prov).get("boxes", "")
    q = store.read_quarantine()
    qc: dict[str, int] = {}
    for r in q.column("reason").to_pylist():
        c = reason_category(r)
        qc[c] = qc.get(c, 0) + 1
    return {
        "counts": dict(store.manifest["counts"]),
        "splits": dict(sorted(splits.items())),
        "supervision": dict(sorted(sup.items())),
        "split_supervision": {k: dict(sorted(v.items())) for k, v in sorted(split_sup.items())},
        "class_images": {space.names[i]: int(counts[i]) for i in space.foreground_ids},
        "class_masks": {space.names[i]: int(mcounts[i]) for i in range(space.num_classes)},
        "masks": n_masks,
        "boxes": {"boxes": n_boxes, "rows": box_rows, "derived_rows": derived_rows},
        "void": {"masks": void_masks, "fraction": void_px / all_px if all_px else 0.0},
        "quarantine": dict(sorted(qc.items())),
    }


def format_summary(store: ImageStore, summary: dict[str, Any] | None = None, max_classes: int | None = None) -> str:
    """Human-readable summary text (per-split, per-class, supervision and quarantine counts).

    Every class of the label space is listed in id order (background and zero counts included;
    ``max_classes`` cuts the list), with the images whose image-level labels hold it ("-" for the
    background, never an image-level label) and the masks holding it; then the void pixels.
    """
    s = summarize(store) if summary is None else summary
    c = s["counts"]
    sp = store.label_space
    lines = [f"store {store.path}  label space {sp.name} ({sp.num_classes} classes, ignore {sp.ignore_index})",
             f"rows read {c['read']} = written {c['written']} + quarantined {c['quarantined']}",
             "", "split        images  " + "  ".join(f"{k:>6}" for k in ("pixel", "box", "image"))]
    for split, n in s["splits"].items():
        ss = s["split_supervision"][split]
        lines.append(f"{split:<12} {n:>6}  " + "  ".join(f"{ss.get(k, 0):>6}" for k in ("pixel", "box", "image")))
    lines.append(f"{'total':<12} {c['written']:>6}  " + "  ".join(f"{s['supervision'].get(k, 0):>6}" for k in ("pixel", "box", "image")))
    if "boxes" in s:
        b = s["boxes"]
        lines.append(f"boxes: {b['boxes']} in {b['rows']} rows ({b['derived_rows']} rows with boxes derived "
                     f"from their masks)")
    lines += ["", "images per class (labels: image-level labels; masks: masks holding the class):",
              f"  {'class':<20} {'labels':>6}  {'masks':>6}"]
    fg = s["class_images"]
    masks = s.get("class_masks", {})
    names = list(sp.names)
    limit = len(names) if max_classes is None else max_classes
    for i, name in enumerate(names[:limit]):
        n = f"{fg[name]:>6}" if name in fg else f"{'-':>6}"
        lines.append(f"  {name:<20} {n}  {masks.get(name, 0):>6}" + ("   (background)" if i == sp.background_id else ""))
    if len(names) > limit:
        lines.append(f"  ... {len(names) - limit} more classes (data summary --max-classes)")
    present = sum(1 for n in fg.values() if n > 0)
    lines.append(f"classes present: {present} of {len(fg)}" + (" (background not counted)" if sp.background_id is not None else ""))
    if "void" in s:
        v = s["void"]
        lines.append(f"void (id {sp.ignore_index}): {100 * v['fraction']:.1f} % of mask pixels, "
                     f"in {v['masks']} of {s['masks']} masks")
    lines += ["", "quarantined rows by reason:"]
    if not s["quarantine"]:
        lines.append("  (none)")
    for reason, n in s["quarantine"].items():
        lines.append(f"  {reason:<32} {n:>6}")
    return "\n".join(lines)
