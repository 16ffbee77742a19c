"""Bad configs fail before any work starts, naming the key and the valid choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysemiseg.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"data": {"store": "nowhere"}, "model": {"backbone": "tiny"}}


def _write(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("cfg, expected", [
    ({**GOOD, "optim": {"lr": 0.1, "learning_rate": 0.1}}, ["optim.learning_rate: unknown key"]),
    ({**GOOD, "bogus": 1}, ["bogus: unknown key"]),
    ({**GOOD, "optim": {"epochs": "many"}}, ["optim.epochs", "integer"]),
    ({**GOOD, "data": {"store": "x", "batch_size": [1]}}, ["data.batch_size"]),
    ({**GOOD, "method": {"name": "deeplab9000"}}, ["method", "unknown method 'deeplab9000'", "strong_only"]),
    ({**GOOD, "model": {"backbone": "resnet9000"}}, ["model.backbone", "resnet9000", "efficientnet_lite0", "tiny"]),
    ({**GOOD, "method": {"name": "strong_only", "params": {"hidden": 3}}}, ["strong_only", "hidden"]),
    ({**GOOD, "scaling": {"placement_strategy": "RANDOM"}}, ["scaling.placement_strategy", "SPREAD"]),
])
def test_cli_train_rejects_bad_config(tmp_path, capsys, cfg, expected) -> None:
    assert main(["train", _write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_job_entry_point_fails_fast_without_starting_ray(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                           _write(tmp_path, {**GOOD, "model": {"backbone": "nope"}})],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.backbone" in proc.stderr and "efficientnet_lite0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_missing_store_is_named(tmp_path, capsys, ray_session) -> None:
    # run storage under tmp_path: the default (./runs) may hold a run of that name from elsewhere
    assert main(["train", _write(tmp_path, {**GOOD, "run": {"storage_path": str(tmp_path / "runs")}})]) == 2
    assert "nowhere" in capsys.readouterr().err
