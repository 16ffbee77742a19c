"""Checkpoint directories: what a training epoch leaves behind and how eval/resume read it back.

Layout of one checkpoint directory (what ``ray.train.report(checkpoint=...)`` persists)::

    model.pt         method.state_dict()                         (torch.save; read weights_only=True)
    train_state.pt   {"optimizers": {group: state_dict}, "scaler": state_dict | None,
                      "epoch": completed epochs, "global_step": int}
    config.yaml      the resolved TrainConfig (round-trips through raysemiseg.config.load_config)
    meta.json        {"format_version", "method", "label_space" (LabelSpace.to_dict() + "name"),
                      "epoch", "global_step", "metrics"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysemiseg.config import TrainConfig, dump_config, load_config
from raysemiseg.labels import LabelSpace

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
    """``meta.json`` of a checkpoint.

    Raises:
        FileNotFoundError: not a raysemiseg checkpoint directory (names the missing file).
    """
    p = Path(directory) / META_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{directory} is not a raysemiseg checkpoint (no {META_FILE})")
    return json.loads(p.read_text())


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from ``path``: ``path`` itself when it holds ``model.pt``, else, for a
    Ray Train run folder, its newest ``checkpoint_*`` directory that holds one (Ray names them
    ``checkpoint_<epoch>`` in order).

    Raises:
        FileNotFoundError: neither (names the path).
    """
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return p
    found = sorted(c for c in p.glob("checkpoint_*") if (c / MODEL_FILE).is_file()) if p.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{p} is neither a checkpoint directory ({MODEL_FILE}) nor a training run folder "
                                "with checkpoint_* directories")
    return found[-1]


def load_method(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the trained method from a checkpoint for inference (eval mode).

    The backbone is built without pretrained weights (the checkpoint holds all weights).

    Returns:
        (method, config, meta).

    Raises:
        FileNotFoundError: not a checkpoint directory.
    """
    from raysemiseg.methods.base import get_method

    d = Path(directory)
    meta = read_meta(d)
    cfg = load_config(d / CONFIG_FILE)
    space = label_space_of(meta)
    model_cfg = cfg.model.model_copy(update={"pretrained": False, "weights_path": None})
    method = get_method(cfg.method.name)(space, model_cfg, cfg.method.build_params())
    method.load_state_dict(torch.load(d / MODEL_FILE, map_location=device, weights_only=True))
    method.set_stage(cfg.method.stage)
    method.to(device).eval()
    return method, cfg, meta
