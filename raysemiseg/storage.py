"""Storage paths and URIs, and the checks a multi-node cluster needs before any work starts.

A *storage location* is a local path (``runs``, ``/mnt/shared/runs``) or a URI (``file:///...``,
``s3://bucket/key``, ``gs://...``). URIs go through ``pyarrow.fs.FileSystem.from_uri``, the same
resolution Ray Train uses for ``RunConfig(storage_path=...)``, so whatever Ray can write a
checkpoint to, this module can read back.

Multi-node rules (:func:`check_shared_paths`, :func:`check_tracking_store`), given the alive nodes
of ``ray.nodes()``:

* more than one alive node: a *relative* path is refused (every Ray worker resolves it against its
  own working directory, so each node writes its own copy);
* nodes on more than one host: an absolute local path must be on a network filesystem (NFS, EFS,
  Lustre, CIFS, a FUSE mount such as s3fs/gcsfuse...) as seen from this process's ``/proc/mounts``,
  or under a prefix listed in ``$RAYSEMISEG_SHARED_PATHS`` (``:``-separated, for shared mounts
  the check cannot recognise); URIs always pass;
* nodes on more than one host: an MLflow store that is a file (``sqlite:``, ``file:``, a plain path)
  is refused for runs with writers on several nodes (Tune trials); use an MLflow server
  (``http(s)://``).

This module sits at the bottom of the import graph (nothing from the package is imported).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SHARED_PATHS_ENV = "RAYSEMISEG_SHARED_PATHS"
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p",
              "virtiofs", "efs", "wekafs", "panfs", "fuse")   # "fuse" matches fuse.* (s3fs, gcsfuse, sshfs...)


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for plain local paths."""
    return "://" in str(path)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` keeping a URI's scheme (``s3://b/runs`` + ``x`` -> ``s3://b/runs/x``)."""
    out = str(base)
    for p in parts:
        out = out.rstrip("/") + "/" + p.strip("/")
    return out


def filesystem(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path or URI (``from_uri`` for URIs; a
    local path is made absolute).

    Raises:
        pyarrow.lib.ArrowInvalid: a URI scheme pyarrow does not know.
    """
    import pyarrow.fs as pafs

    s = str(path)
    if is_uri(s):
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), str(Path(s).resolve())


def exists(path: str | os.PathLike[str], kind: str = "any") -> bool:
    """Whether ``path`` (local or URI) exists; ``kind``: ``"any"``, ``"file"`` or ``"dir"``."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    t = fs.get_file_info(p).type
    if kind == "file":
        return t == pafs.FileType.File
    if kind == "dir":
        return t == pafs.FileType.Directory
    return t != pafs.FileType.NotFound


def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of a file (local or URI).

    Raises:
        FileNotFoundError: no such file (names it).
    """
    if not exists(path, "file"):
        raise FileNotFoundError(f"{path}: no such file")
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a file (local or URI), creating its parent folders."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


# ----------------------------------------------------------------------------------------------
# multi-node checks
# ----------------------------------------------------------------------------------------------


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster (``ray.nodes()`` entries with ``Alive``)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def hosts(nodes: Sequence[Mapping[str, Any]]) -> set[str]:
    """Distinct host addresses (``NodeManagerAddress``) of ``nodes``: raylets on one machine share
    its filesystem, so they count once."""
    return {str(n.get("NodeManagerAddress", "")) for n in nodes}


def read_mounts(text: str | None = None) -> list[tuple[str, str]]:
    """``[(mount point, fstype)]`` from ``/proc/mounts`` (or ``text`` in that format); [] when
    unreadable (not Linux)."""
    if text is None:
        try:
            text = Path("/proc/mounts").read_text()
        except OSError:
            return []
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3:
            out.append((f[1].replace("\\040", " "), f[2]))
    return out


def fs_type(path: str, mounts: Iterable[tuple[str, str]]) -> str | None:
    """The filesystem type of the mount holding absolute ``path`` (longest mount-point prefix)."""
    best, kind = "", None
    for point, t in mounts:
        prefix = point.rstrip("/") + "/"
        if (path == point or path.startswith(prefix) or point == "/") and len(point) >= len(best):
            best, kind = point, t
    return kind


def _is_shared(path: str, mounts: Iterable[tuple[str, str]], shared_prefixes: Sequence[str]) -> bool:
    if any(path == s.rstrip("/") or path.startswith(s.rstrip("/") + "/") for s in shared_prefixes if s):
        return True
    t = fs_type(path, mounts) or ""
    return t.split(".")[0] in NETWORK_FS


def check_shared_paths(paths: Mapping[str, str | os.PathLike[str] | None], nodes: Sequence[Mapping[str, Any]], *,
                       mounts: Iterable[tuple[str, str]] | None = None,
                       shared_prefixes: Sequence[str] | None = None, what: str = "this run") -> None:
    """Refuse paths that other nodes of the cluster cannot see (see the module docstring).

    Args:
        paths: ``{config key: path or URI}`` the run reads or writes (None entries are skipped).
        nodes: alive nodes, as ``ray.nodes()`` lists them (``NodeManagerAddress`` is read).
        mounts: ``[(mount point, fstype)]`` (default: this machine's ``/proc/mounts``).
        shared_prefixes: absolute path prefixes known to be shared (default: ``$RAYSEMISEG_SHARED_PATHS``).
        what: names the caller in the message.

    Raises:
        ValueError: a relative path on a multi-node cluster, or a node-local absolute path on a
            multi-host one; the message names each key and says what to mount or set.
    """
    if len(nodes) <= 1:
        return
    multi_host = len(hosts(nodes)) > 1
    mounts = read_mounts() if mounts is None else list(mounts)
    if shared_prefixes is None:
        shared_prefixes = [s for s in os.environ.get(SHARED_PATHS_ENV, "").split(":") if s]
    bad = []
    for key, value in paths.items():
        if value is None or str(value) == "" or is_uri(value):
            continue
        p = str(value)
        if not Path(p).is_absolute():
            bad.append(f"{key}={p!r} is relative (each Ray worker resolves it against its own working directory)")
        elif multi_host and not _is_shared(p, mounts, shared_prefixes):
            bad.append(f"{key}={p!r} is on a node-local filesystem ({fs_type(p, mounts) or 'unknown'})")
    if bad:
        raise ValueError(
            f"{what} runs on a cluster of {len(nodes)} nodes ({len(hosts(nodes))} hosts), where every path must be "
            "visible to every node: " + "; ".join(bad) + ". Put it on a shared filesystem mounted at the same path "
            "on every node (NFS/EFS, e.g. /mnt/shared/...; see cluster.yaml) or use a URI (run.storage_path: "
            f"s3://bucket/raysemiseg/runs); a shared mount this check does not recognise can be listed in "
            f"${SHARED_PATHS_ENV} (':'-separated prefixes).")


def require_shared_paths(paths: Mapping[str, str | os.PathLike[str] | None], what: str = "this run") -> None:
    """:func:`check_shared_paths` against the connected Ray cluster's alive nodes (Ray must be
    initialised)."""
    check_shared_paths(paths, alive_nodes(), what=what)


def check_tracking_store(uri: str, nodes: Sequence[Mapping[str, Any]], what: str = "this sweep") -> None:
    """Refuse a file-backed MLflow store (``sqlite:``, ``file:``, a path) when ``nodes`` span more than
    one host: writers on several hosts (Tune trials and their Train controllers) would share one
    SQLite file over NFS, which SQLite does not support.

    Raises:
        ValueError: names the store and says to run an MLflow server.
    """
    if len(hosts(nodes)) <= 1 or uri.startswith(("http://", "https://", "databricks")):
        return
    raise ValueError(
        f"{what} runs on {len(hosts(nodes))} hosts, and its trials log to MLflow from whichever node they run on; "
        f"the file-backed store {uri!r} cannot take writers from several hosts. Run an MLflow server (e.g. "
        "`mlflow server --host 0.0.0.0 --backend-store-uri sqlite:////mnt/shared/mlflow.db` on the head) and set "
        "tracking.tracking_uri or $MLFLOW_TRACKING_URI to its http:// address.")


__all__ = ["alive_nodes", "check_shared_paths", "check_tracking_store", "exists", "filesystem", "fs_type", "hosts",
           "is_uri", "join", "read_mounts", "read_text", "require_shared_paths", "write_text"]
