"""Tiny run configs over the session's real sample store (tiny backbone, few rows, 64 px crops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def tiny_config(store: Path, runs: Path, name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict that trains in seconds on CPU; ``sections`` update each section."""
    cfg: dict[str, Any] = {
        "data": {"store": str(store), "crop_size": 64, "batch_size": 4, "max_train_rows": 12, "max_val_rows": 4,
                 "val_size": 96, "shuffle_buffer": 8},
        "model": {"backbone": "tiny", "pretrained": False},
        "method": {"name": "strong_only", "params": {"head_hidden": 16, "head_dilation": 2}},
        "optim": {"epochs": 2, "steps_per_epoch": 2, "lr": 0.01},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"name": name, "storage_path": str(runs), "max_failures": 0},
        "tracking": {"enabled": False},
    }
    for key, upd in sections.items():
        cfg[key] = {**cfg.get(key, {}), **upd}
    return cfg


@pytest.fixture()
def make_config():
    """:func:`tiny_config` as a fixture (test modules are not a package)."""
    return tiny_config


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"
