"""The pseudo-label store: shards written atomically, a manifest, and the read API.

Layout (fixed, COMMON.md)::

    LABELS/shards/shard-00000000.parquet       LABEL_STORE_SCHEMA, one row per (image, recipe)
    LABELS/quarantine/shard-00000000.parquet   QUARANTINE_SCHEMA, images a stage refused, with the
                                               reason (only for shards that quarantined a row)
    LABELS/manifest.json                       recipe, resume key, provenance, sharding, counts, timings

Shard indices are zero-padded to 8 digits (names sort in shard order up to 10^8 shards; readers
parse the index, so stores written with 5 digits read the same). The manifest holds no per-shard
map: the committed label files are the truth (:func:`committed_shards`).

Integrity rules:

* a shard is committed (by the Ray worker that made it) by writing its quarantine file (when it
  has quarantined rows), then its label file, each to a hidden temporary name unique to the
  writer in the same folder followed by ``os.replace`` (atomic on POSIX), so a shard's label file
  exists only when the shard is complete and a retried task rewrites identical content; a killed
  run leaves at most temporary files, which the next run removes;
* shard k always holds the same rows (the pipeline's sharding is a pure function of the image store
  and the recipe's row selection), so a rerun that skips committed shards ends with exactly the rows
  of an uninterrupted run;
* per shard and in total: rows in = rows written + rows quarantined (checked before the manifest
  says ``complete``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from raysemiseg.data.schema import LABEL_STORE_SCHEMA, QUARANTINE_SCHEMA

__all__ = ["LabelStore", "clean_partial", "committed_shards", "open_label_store", "shard_index", "shard_name",
           "write_manifest", "write_shard"]

MANIFEST = "manifest.json"
LABEL_STORE_VERSION = 1


def shard_name(k: int) -> str:
    """File name of shard ``k`` (``shard-00000007.parquet``)."""
    return f"shard-{k:08d}.parquet"


def shard_index(path: str | Path) -> int:
    """The shard index of a shard file name (any zero padding)."""
    return int(Path(path).stem.split("-")[1])


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_shard(root: str | Path, k: int, rows: pa.Table, quarantine: pa.Table) -> None:
    """Commit shard ``k``: quarantine file first (only when it has rows), label file last (each atomic).

    Args:
        root: the label store folder.
        k: shard index.
        rows: ``LABEL_STORE_SCHEMA`` rows of the shard.
        quarantine: ``QUARANTINE_SCHEMA`` rows of the shard (may be empty).

    Raises:
        ValueError: a table does not have the declared schema.
    """
    root = Path(root)
    if not rows.schema.equals(LABEL_STORE_SCHEMA, check_metadata=False):
        raise ValueError(f"shard {k}: rows do not have LABEL_STORE_SCHEMA: {rows.schema}")
    if not quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=False):
        raise ValueError(f"shard {k}: quarantine rows do not have QUARANTINE_SCHEMA: {quarantine.schema}")
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "quarantine").mkdir(parents=True, exist_ok=True)
    if quarantine.num_rows:
        _atomic_write_table(quarantine.replace_schema_metadata(QUARANTINE_SCHEMA.metadata),
                            root / "quarantine" / shard_name(k))
    _atomic_write_table(rows.replace_schema_metadata(LABEL_STORE_SCHEMA.metadata), root / "shards" / shard_name(k))


def committed_shards(root: str | Path) -> set[int]:
    """Indices of the shards whose label file exists (complete shards)."""
    return {shard_index(p) for p in Path(root, "shards").glob("shard-*.parquet")}


def clean_partial(root: str | Path) -> list[Path]:
    """Remove temporary files a killed run left behind and quarantine files of uncommitted shards.

    Returns:
        the removed paths.
    """
    root = Path(root)
    removed = []
    done = committed_shards(root)
    for sub in ("shards", "quarantine"):
        for p in sorted((root / sub).glob(".*.tmp")):
            p.unlink()
            removed.append(p)
    for p in sorted((root / "quarantine").glob("shard-*.parquet")):
        if shard_index(p) not in done:
            p.unlink()
            removed.append(p)
    return removed


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))  # O(1) in the number of shards
    os.replace(tmp, path)


class LabelStore:
    """A pseudo-label store (read side).

    Attributes:
        path: the store folder.
        manifest: parsed ``manifest.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"{self.path} is not a pseudo-label store (no {MANIFEST}); "
                                    f"write one with `raysemiseg pseudolabel RECIPE.yaml --store STORE --out {self.path}`")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())

    @property
    def recipe(self) -> str:
        return str(self.manifest["recipe"]["name"])

    @property
    def complete(self) -> bool:
        """True when every shard was committed and the counts check out."""
        return bool(self.manifest.get("complete"))

    @property
    def files(self) -> list[Path]:
        return sorted((self.path / "shards").glob("shard-*.parquet"), key=shard_index)

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All label rows (shard order) as one ``LABEL_STORE_SCHEMA`` table (or the given columns)."""
        cols = list(columns) if columns is not None else None
        parts = [pq.read_table(p, columns=cols, schema=LABEL_STORE_SCHEMA) for p in self.files]
        return pa.concat_tables(parts) if parts else LABEL_STORE_SCHEMA.empty_table().select(cols or LABEL_STORE_SCHEMA.names)

    def read_quarantine(self) -> pa.Table:
        """All quarantine rows of committed shards."""
        done = committed_shards(self.path)
        parts = [pq.read_table(p, schema=QUARANTINE_SCHEMA)
                 for p in sorted((self.path / "quarantine").glob("shard-*.parquet"), key=shard_index)
                 if shard_index(p) in done]
        return pa.concat_tables(parts) if parts else QUARANTINE_SCHEMA.empty_table()

    def masks(self) -> dict[str, bytes]:
        """``image_id -> encoded PNG mask``."""
        t = self.read_table(["image_id", "mask"])
        return dict(zip(t.column("image_id").to_pylist(), t.column("mask").to_pylist()))

    def __len__(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)


def open_label_store(path: str | Path) -> LabelStore:
    """Open a pseudo-label store.

    Raises:
        FileNotFoundError: no ``manifest.json`` in ``path``.
    """
    return LabelStore(path)
