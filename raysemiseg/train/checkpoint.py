"""Checkpoint directories: what a training epoch leaves behind and how eval/resume read it back.

Layout of one checkpoint directory (what ``ray.train.report(checkpoint=...)`` persists)::

    model.pt         method.state_dict()                         (torch.save; read weights_only=True)
    train_state.pt   {"optimizers": {group: state_dict}, "scaler": state_dict | None,
                      "epoch": completed epochs, "global_step": int}
    config.yaml      the resolved TrainConfig (round-trips through raysemiseg.config.load_config)
    meta.json        {"format_version", "method", "label_space" (LabelSpace.to_dict() + "name"),
                      "epoch", "global_step", "metrics"}

Where a checkpoint can be: a checkpoint directory, a Ray Train run folder (its newest
``checkpoint_*`` with ``model.pt``), or either as a URI (``file://``, ``s3://``... whatever
``pyarrow.fs.FileSystem.from_uri`` resolves, as Ray Train does for ``run.storage_path``).
:func:`local_checkpoint` is the one function every reader goes through (eval, pseudo-label
``--checkpoint``, ``load_method``): local paths are used in place, URIs are copied once into a
local cache folder (``$RAYSEMISEG_CACHE_DIR/checkpoints`` or ``~/.cache/raysemiseg/checkpoints``)
and copied again when the remote files change (size or modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysemiseg.config import TrainConfig, dump_config, load_config
from raysemiseg.labels import LabelSpace
from raysemiseg.storage import filesystem, is_uri, join

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.pt", "train_state.pt", "config.yaml", "meta.json"


def save_checkpoint(directory: str | Path, method: nn.Module, cfg: TrainConfig, label_space: LabelSpace, *,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    scaler: torch.amp.GradScaler | None = None, epoch: int = 0, global_step: int = 0,
                    metrics: dict[str, float] | None = None) -> Path:
    """Write a checkpoint into ``directory`` (created) and return it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(method.state_dict(), d / MODEL_FILE)
    torch.save({"optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                "epoch": int(epoch), "global_step": int(global_step)}, d / STATE_FILE)
    dump_config(cfg, d / CONFIG_FILE)
    meta = {"format_version": FORMAT_VERSION, "method": cfg.method.name,
            "label_space": {**label_space.to_dict(), "name": label_space.name},
            "epoch": int(epoch), "global_step": int(global_step),
            "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}
    (d / META_FILE).write_text(json.dumps(meta, indent=2))
    return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint directory, local or a URI (read in place, nothing is copied).

    Raises:
        FileNotFoundError: not a raysemiseg checkpoint directory (names the missing file).
    """
    import pyarrow.fs as pafs

    fs, p = filesystem(join(str(directory), META_FILE))
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise FileNotFoundError(f"{directory} is not a raysemiseg checkpoint (no {META_FILE})")
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode())


def label_space_of(meta: dict[str, Any]) -> LabelSpace:
    """The label space stored in a checkpoint's meta."""
    ls = meta["label_space"]
    return LabelSpace(name=ls["name"], names=tuple(ls["names"]), palette=ls["palette"],
                      ignore_index=ls["ignore_index"], background=ls["background"])


def load_train_state(directory: str | Path, method: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                     scaler: torch.amp.GradScaler | None, device: torch.device | str = "cpu") -> dict[str, int]:
    """Restore model, optimizers and scaler in place (resume); returns {"epoch", "global_step"}."""
    d = Path(directory)
    method.load_state_dict(torch.load(d / MODEL_FILE, map_location=device, weights_only=True))
    state = torch.load(d / STATE_FILE, map_location=device, weights_only=True)
    for name, opt in optimizers.items():
        if name in state["optimizers"]:
            opt.load_state_dict(state["optimizers"][name])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return {"epoch": int(state["epoch"]), "global_step": int(state["global_step"])}


def find_checkpoint(path: str | Path) -> str:
    """The checkpoint directory ``path`` names, without copying anything: ``path`` itself when it
    holds ``model.pt``, else, for a Ray Train run folder, its newest ``checkpoint_*`` directory that
    holds one (Ray Train V2 names them ``checkpoint_<timestamp>``, which sort in time order). Works
    the same for local paths and URIs; a URI stays a URI (same scheme).

    Raises:
        FileNotFoundError: neither (names the path).
    """
    import pyarrow.fs as pafs

    s = str(path)
    fs, p = filesystem(s)
    if fs.get_file_info(p.rstrip("/") + "/" + MODEL_FILE).type == pafs.FileType.File:
        return s if is_uri(s) else p
    found = run_checkpoints(s)
    if not found:
        raise FileNotFoundError(f"{s} is neither a checkpoint directory ({MODEL_FILE}) nor a training run folder "
                                "with checkpoint_* directories")
    return found[-1]


def run_checkpoints(run_dir: str | Path) -> list[str]:
    """The ``checkpoint_*`` directories of a Ray Train run folder that hold ``model.pt``, oldest first
    (Ray Train V2's ``checkpoint_<timestamp>`` names sort in time order); local paths or URIs, as
    ``run_dir`` is given. Empty when the folder does not exist."""
    import pyarrow.fs as pafs

    s = str(run_dir)
    fs, p = filesystem(s)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    names = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(p))
                   if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
                   and fs.get_file_info(info.path + "/" + MODEL_FILE).type == pafs.FileType.File)
    return [join(s, n) if is_uri(s) else str(Path(p) / n) for n in names]


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint directory from ``path`` (a checkpoint directory, a run folder, or a URI of
    either): same as :func:`local_checkpoint`.

    Raises:
        FileNotFoundError: neither (names the path).
    """
    return local_checkpoint(path)


def cache_root() -> Path:
    """Where URI checkpoints are copied: ``$RAYSEMISEG_CACHE_DIR/checkpoints``, else
    ``~/.cache/raysemiseg/checkpoints``."""
    base = os.environ.get("RAYSEMISEG_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "raysemiseg") / "checkpoints"


def local_checkpoint(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The one way to turn a checkpoint reference into a local checkpoint directory.

    Args:
        path: a checkpoint directory, a Ray Train run folder (its newest checkpoint, see
            :func:`find_checkpoint`), or a URI of either (``file://``, ``s3://``, ``gs://``...).
        cache_dir: where URI checkpoints are copied (default :func:`cache_root`); each one goes
            to ``<cache_dir>/<sha256(uri)[:16]>`` with a ``.source.json`` recording the remote
            files' sizes and modification times. The copy is reused while they are unchanged and
            replaced (atomically: a copy into a temporary folder, then a rename) otherwise.

    Returns:
        A local directory holding ``model.pt`` (and the checkpoint's other files).

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (names it).
    """
    import pyarrow.fs as pafs

    found = find_checkpoint(path)
    if not is_uri(found):
        return Path(found)
    fs, p = filesystem(found)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File]
    stamp = {"uri": found, "files": {i.path[len(p.rstrip("/")) + 1:]: [i.size, i.mtime_ns] for i in infos}}
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    dest = root / hashlib.sha256(found.encode()).hexdigest()[:16]
    src_file = dest / ".source.json"
    if src_file.is_file() and json.loads(src_file.read_text()) == stamp and (dest / MODEL_FILE).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    for rel in stamp["files"]:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(p.rstrip("/") + "/" + rel) as src, open(tmp / rel, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    (tmp / ".source.json").write_text(json.dumps(stamp, sort_keys=True))
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process put the same copy there first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_method(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the trained method from a checkpoint for inference (eval mode).

    ``directory``: anything :func:`local_checkpoint` accepts (a checkpoint directory, a run
    folder, a URI). The backbone is built without pretrained weights (the checkpoint holds all
    weights).

    Returns:
        (method, config, meta).

    Raises:
        FileNotFoundError: not a checkpoint directory.
    """
    from raysemiseg.methods.base import get_method

    d = local_checkpoint(directory)
    meta = read_meta(d)
    cfg = load_config(d / CONFIG_FILE)
    space = label_space_of(meta)
    model_cfg = cfg.model.model_copy(update={"pretrained": False, "weights_path": None})
    method = get_method(cfg.method.name)(space, model_cfg, cfg.method.build_params())
    method.load_state_dict(torch.load(d / MODEL_FILE, map_location=device, weights_only=True))
    method.set_stage(cfg.method.stage)
    method.to(device).eval()
    return method, cfg, meta
