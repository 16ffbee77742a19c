"""raysemiseg/runtime.py: the local Ray's workers start with the allocator settings (GLIBC_TUNABLES; a fresh
local Ray's worker is checked in tests/train/test_cpu_budget.py, beside the training run that starts it)."""

from __future__ import annotations

from pathlib import Path

from raysemiseg.runtime import MALLOC_TUNABLES, worker_env_vars

ROOT = Path(__file__).resolve().parents[1]


def test_worker_env_vars_appends_to_a_users_tunables() -> None:
    assert MALLOC_TUNABLES == "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"
    assert worker_env_vars({}) == {"GLIBC_TUNABLES": MALLOC_TUNABLES}
    # glibc reads the tunables left to right, so ours come last and a user's other tunable is kept
    assert worker_env_vars({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + MALLOC_TUNABLES}


def test_cluster_yaml_starts_every_raylet_with_the_allocator_settings() -> None:
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert len(starts) == 1 and starts[0].startswith(f"GLIBC_TUNABLES={MALLOC_TUNABLES} "), key
