"""raysemiseg/runtime.py: the local Ray's workers start with the allocator settings (GLIBC_TUNABLES)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from raysemiseg.runtime import MALLOC_TUNABLES, worker_env_vars

ROOT = Path(__file__).resolve().parents[1]


def test_worker_env_vars_appends_to_a_users_tunables() -> None:
    assert MALLOC_TUNABLES == "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"
    assert worker_env_vars({}) == {"GLIBC_TUNABLES": MALLOC_TUNABLES}
    # glibc reads the tunables left to right, so ours come last and a user's other tunable is kept
    assert worker_env_vars({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + MALLOC_TUNABLES}


SCRIPT = """
import os, ray
from raysemiseg.runtime import ensure_ray
ensure_ray(num_cpus=1, log_to_driver=False)
@ray.remote(num_cpus=1)
def env():
    return os.environ.get("GLIBC_TUNABLES"), os.getpid()
tunables, pid = ray.get(env.remote())
print("worker", tunables, pid != os.getpid())
print("driver", os.environ.get("GLIBC_TUNABLES"))
"""


def test_a_fresh_local_ray_starts_its_workers_with_the_allocator_settings() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GLIBC_TUNABLES")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert f"worker {MALLOC_TUNABLES} True" in lines      # a separate worker process, started with them
    assert "driver None" in lines                          # the driver's own environment is not touched


def test_cluster_yaml_starts_every_raylet_with_the_allocator_settings() -> None:
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert len(starts) == 1 and starts[0].startswith(f"GLIBC_TUNABLES={MALLOC_TUNABLES} "), key
