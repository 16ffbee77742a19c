"""Shared fixtures: one local Ray session for the whole test session (explicit CPU budget).

Tests that need their own cluster (the 2-node test) run it in a subprocess so this session is
undisturbed. Logical CPUs are over-provisioned (4 on a 2-core machine) so a Tune driver, a Train
worker and a Data read can be scheduled together without deadlock.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s by default, so each of the suite's short training runs waits
# up to 2 s after its last step; 0.25 s keeps the poll and drops most of the wait
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

RAY_TEST_CPUS = 4


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray head for all tests (127.0.0.1), with its dashboard on 127.0.0.1: the State API it
    serves is what Ray Train uses to free the workers of a Tune trial the scheduler stopped."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a fresh local instance, never a cluster left by `ray start` on this machine
            num_cpus=RAY_TEST_CPUS,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_store(ray_session, tmp_path_factory):
    """The bundled COCO sample (318 images, <= 320 px) built once into a VOC-21 image store.

    Returns the store folder (a ``Path``); open it with ``raysemiseg.data.store.open_store``.
    """
    from raysemiseg.data.sample import sample_sources
    from raysemiseg.data.store import Source, build_store

    out = tmp_path_factory.mktemp("sample_store") / "store"
    build_store([Source("coco", (str(a), str(i))) for a, i in sample_sources()], "voc21", out, progress=False)
    return out


@pytest.fixture(scope="session")
def sample_split(sample_store):
    """C3S split-set 1 of ``sample_store`` (seed 0, mixed images weak), as a split-file Path."""
    from raysemiseg.data.splits import SplitSpec, make_split, write_split

    return write_split(make_split(sample_store, SplitSpec("c3s", split_set=1)),
                       sample_store.parent / "splits" / "c3s-1.parquet")
