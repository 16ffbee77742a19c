"""No silent hangs: a run whose Train workers would hold every CPU (so its Ray Data tasks never get one)
either runs, because raysemiseg sizes the local Ray for the workers plus Ray Data, or fails at once
naming the knobs. Each entry point runs as a subprocess CLI with a timeout: a hang fails the test.

``base_sample.yaml`` sets ``scaling.cpus_per_worker: 2``; on a 2-core machine the local Ray used to
get 2 CPUs, the worker took both and ``raysemiseg train`` waited forever on its first batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysemiseg.runtime import CpuNeed, local_cpu_default

ROOT = Path(__file__).resolve().parents[2]
KNOBS = "scaling.cpus_per_worker"


def _run(args: list[str], cwd: Path, timeout: int, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GLIBC_TUNABLES")}
    env.update({"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _train_yaml(make_config, store: Path, tmp: Path, name: str, cpus_per_worker: float) -> Path:
    cfg = make_config(store, tmp / "runs", name, optim={"epochs": 1, "steps_per_epoch": 1},
                      scaling={"num_workers": 1, "cpus_per_worker": cpus_per_worker},
                      data={"max_train_rows": 4, "max_val_rows": 2})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_local_ray_is_sized_for_the_workers_plus_data() -> None:
    cores = max(os.cpu_count() or 1, 2)
    need = CpuNeed(held=2 * 3.0, data=1.0)
    assert need.total == 7.0
    assert local_cpu_default(need) == max(cores, 7)
    assert local_cpu_default() == cores


#: ``raysemiseg train`` in a fresh process, then one more task on the local Ray that command started: its
#: worker's environment (the allocator settings, raysemiseg.runtime.worker_env_vars) and the driver's own
TRAIN_THEN_ENV = """
import os, sys
import ray
from raysemiseg.cli import main
rc = main(["train", sys.argv[1]])
@ray.remote(num_cpus=1)
def env():
    return os.environ.get("GLIBC_TUNABLES"), os.getpid()
tunables, pid = ray.get(env.remote())
print("worker", tunables, pid != os.getpid())
print("driver", os.environ.get("GLIBC_TUNABLES"))
sys.exit(rc)
"""


def test_the_former_hang_trains_on_a_local_ray_with_room_for_data(sample_store, tmp_path, make_config) -> None:
    """The former hang trains; the local Ray that ``raysemiseg train`` starts gives its workers the glibc
    malloc tunables (:data:`raysemiseg.runtime.MALLOC_TUNABLES`) and leaves the driver's environment alone."""
    from raysemiseg.runtime import MALLOC_TUNABLES

    # cpus_per_worker = every core of this machine (2 on the CI box): the old local Ray had exactly that
    cores = max(os.cpu_count() or 1, 2)
    cfg = _train_yaml(make_config, sample_store, tmp_path, "hang", cpus_per_worker=cores)
    proc = _run(["-c", TRAIN_THEN_ENV, str(cfg)], tmp_path, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"val_miou"' in proc.stdout
    lines = proc.stdout.splitlines()
    assert f"worker {MALLOC_TUNABLES} True" in lines      # a separate worker process, started with them
    assert "driver None" in lines                         # the driver's own environment is not touched


def _sweep(tmp: Path, base: Path) -> list[str]:
    sweep = {"name": "budget", "base": str(base), "search_space": {"optim.lr": {"grid": [0.01]}},
             "resources": {"local_num_cpus": 2}, "storage_path": str(tmp / "sweeps")}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return ["-m", "raysemiseg.cli", "tune", str(tmp / "sweep.yaml")]


def _experiment(make_config, tmp: Path, store: Path) -> list[str]:
    base = make_config(store, tmp / "runs", "unused", scaling={"num_workers": 1, "cpus_per_worker": 2})
    exp = {"name": "budget", "workdir": str(tmp / "exp"), "num_cpus": 2,
           "store": {"path": str(store), "build_from_sample": False}, "base": base,
           "arms": [{"name": "strong", "steps": [{"name": "train", "train": {}}]}], "experiment_tracking": False}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    return ["-m", "raysemiseg.cli", "experiment", str(tmp / "exp.yaml")]


def _pseudolabel(tmp: Path, store: Path) -> list[str]:
    recipe = {"name": "bbox_rect_2cpu", "stages": [{"name": "bbox_rect"}], "cpus_per_task": 2.0}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return ["-m", "raysemiseg.cli", "pseudolabel", str(tmp / "recipe.yaml"), "--store", str(store),
            "--out", str(tmp / "labels"), "--num-cpus", "1", "--max-rows", "4", "--no-progress"]


@pytest.mark.parametrize("entry", ["train --num-cpus", "tune", "experiment", "pseudolabel", "jobs/train.py"])
def test_a_budget_that_cannot_fit_fails_at_once_naming_the_knobs(entry, ray_session, sample_store, tmp_path,
                                                                 make_config) -> None:
    knobs: tuple[str, ...] = (KNOBS, "--num-cpus")
    if entry == "train --num-cpus":
        args = ["-m", "raysemiseg.cli", "train", str(_train_yaml(make_config, sample_store, tmp_path, "t", 2)), "--num-cpus", "2"]
    elif entry == "tune":
        args = _sweep(tmp_path, _train_yaml(make_config, sample_store, tmp_path, "t", 2))
        knobs = (KNOBS, "resources.local_num_cpus")
    elif entry == "experiment":
        args = _experiment(make_config, tmp_path, sample_store)
    elif entry == "pseudolabel":
        args = _pseudolabel(tmp_path, sample_store)
        knobs = ("cpus_per_task", "--num-cpus")
    else:  # joining a running Ray (this session's: 4 CPUs) whose CPUs the workers would all hold
        gcs = ray_session.get_runtime_context().gcs_address
        args = [str(ROOT / "jobs" / "train.py"), "--config", str(_train_yaml(make_config, sample_store, tmp_path, "t", 4)),
                "--address", gcs]
    proc = _run(args, tmp_path, timeout=180)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "would wait forever" in proc.stderr, proc.stderr[-3000:]
    for knob in knobs:
        assert knob in proc.stderr, (knob, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
