"""Starting or joining Ray: the one way for the whole package.

Every entry point (``data build``, ``pseudolabel``, ``train``, ``eval``, ``tune``, ``experiment``,
the jobs and benchmarks) calls :func:`ensure_ray`, so a process that first touches Ray through any
of them gets the same cluster: the State API (dashboard) on 127.0.0.1 that ``raysemiseg tune``
needs, and the same logging settings.

This module sits at the bottom of the import graph (it imports nothing from the package), so
``raysemiseg.data`` may use it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: logical CPUs kept free for Ray Data tasks beside a run's long-lived actors (Train workers)
DATA_CPUS = 1.0
#: set to 1 to skip the CPU budget check when joining a cluster (an autoscaling cluster whose
#: nodes are not up yet: its current CPUs understate what it will have)
SKIP_CPU_CHECK_ENV = "RAYSEMISEG_SKIP_CPU_CHECK"


#: glibc malloc tunables for Ray's worker processes. A training step allocates and frees tensors of
#: tens of MB (8 x 21 x 192 x 192 float32 logits and their gradients are 25 MB each); above glibc's
#: mmap threshold each one is a fresh mmap whose pages fault in on first touch and are unmapped on
#: free, every step. Serving them from the heap and never trimming it made the quickstart's
#: strong-only step 0.90-0.95x as long on 2 cores (``benchmarks/allocator.py``). Read by the dynamic
#: loader at process start, so it must be in the environment the worker is started with: the local
#: Ray's job ``runtime_env`` here, the ``ray start`` commands in ``cluster.yaml``. Workers keep their
#: peak heap (no trim).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"


def worker_env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``{"GLIBC_TUNABLES": ...}`` for Ray workers: :data:`MALLOC_TUNABLES` after any tunables already in
    ``environ`` (default ``os.environ``; glibc takes the last value of a repeated tunable, so a user's
    own setting of another tunable is kept). Non-glibc platforms ignore the variable."""
    env = os.environ if environ is None else environ
    mine = env.get("GLIBC_TUNABLES", "")
    return {"GLIBC_TUNABLES": f"{mine}:{MALLOC_TUNABLES}" if mine else MALLOC_TUNABLES}


@dataclass(frozen=True)
class CpuNeed:
    """Logical CPUs a run needs on Ray at the same time, so that it cannot hang waiting for one.

    A Ray Train worker holds its ``cpus_per_worker`` for the whole run; the Ray Data tasks that
    feed it (read, decode, augment) need CPUs of their own. When the workers hold every CPU of
    the cluster, the data tasks stay pending forever and training waits forever on its first batch
    (Ray Data sizes itself from the cluster's *total* CPUs, so it does not notice).

    Attributes:
        held: CPUs held for the whole run by its actors (Train workers, a Tune trial's driver).
        data: CPUs that must stay free beside them for Ray Data tasks (at least one task's CPUs).
        per_node: the largest single actor or task: it must fit on one node.
        what: the run, for messages (``"train run 'x'"``).
        knobs: the settings that set ``held``/``data``, named in the error (``"scaling.cpus_per_worker"``).
    """

    held: float = 0.0
    data: float = DATA_CPUS
    per_node: float = 0.0
    what: str = "the run"
    knobs: str = ""

    @property
    def total(self) -> float:
        """``held + data``: the logical CPUs the cluster must have."""
        return self.held + self.data


def local_cpu_default(need: CpuNeed | None = None) -> int:
    """Logical CPUs of a local Ray started without ``num_cpus``: max(cores, 2), raised to
    ``ceil(need.total)`` so the run's actors leave CPUs for its data tasks."""
    n = max(os.cpu_count() or 1, 2)
    return max(n, math.ceil(need.total - 1e-9)) if need is not None else n


def _budget_error(need: CpuNeed, have: float, where: str, fix: str) -> ValueError:
    knobs = f"{need.knobs}, " if need.knobs else ""
    return ValueError(
        f"{need.what} needs {need.total:g} logical CPUs ({need.held:g} held by its workers + {need.data:g} "
        f"for Ray Data tasks; the largest single one {need.per_node:g}) but {where} has {have:g}: the data "
        f"tasks would wait forever for a CPU. Lower {knobs}or {fix}")


def check_cpu_budget(need: CpuNeed) -> None:
    """Fail at once when the connected Ray cannot run ``need`` (instead of hanging).

    Compares with the cluster's current total logical CPUs and its largest alive node; skipped
    when ``$RAYSEMISEG_SKIP_CPU_CHECK`` is 1 (an autoscaling cluster whose nodes are not up yet).

    Raises:
        ValueError: too few CPUs in all, or no node with ``need.per_node`` CPUs; names the knobs.
    """
    import ray

    if os.environ.get(SKIP_CPU_CHECK_ENV) == "1":
        return
    fix = ("give Ray more CPUs: num_cpus / --num-cpus for a local Ray, more nodes for a cluster "
           f"(an autoscaling cluster still scaling up: {SKIP_CPU_CHECK_ENV}=1)")
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if have + 1e-9 < need.total:
        raise _budget_error(need, have, "the connected Ray", fix)
    if need.per_node > 0:
        biggest = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")),
                      default=0.0)
        if biggest + 1e-9 < need.per_node:
            raise _budget_error(need, biggest, "the largest node of the connected Ray", fix)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, log_to_driver: bool = True,
               need: CpuNeed | None = None) -> None:
    """Connect to Ray once per process, with room for the run's data tasks.

    Order: an already initialised Ray (kept as it is); ``$RAY_ADDRESS`` (set by ``ray job submit``)
    or an explicit ``address``; ``address="auto"`` joins a running cluster when there is one and
    falls back to a local one; otherwise a fresh local instance (``address="local"``: never a
    cluster that happens to run on this machine) bound to 127.0.0.1, with the dashboard (State API)
    on 127.0.0.1, ``num_cpus`` logical CPUs (default :func:`local_cpu_default` of ``need``:
    the workers' CPUs plus :data:`DATA_CPUS` for Ray Data, at least the cores) and the allocator
    settings of :func:`worker_env_vars` in its workers' environment (a joined cluster sets them at
    ``ray start``, see ``cluster.yaml``).

    With ``need``, every path then checks the connected Ray with :func:`check_cpu_budget`, and an
    explicit ``num_cpus`` below ``need.total`` fails before starting anything.

    Args:
        address: a Ray address, ``"auto"``, ``"local"`` (a fresh local instance), or None (local
            unless ``$RAY_ADDRESS``).
        num_cpus: logical CPUs of a local instance (ignored when joining a cluster).
        log_to_driver: stream worker logs to this process.
        need: the CPUs the caller's run needs at once (None = no check).

    Raises:
        ConnectionError: an explicit (non-"auto") address could not be reached.
        ValueError: the CPU budget cannot fit ``need`` (names the knobs), before any work starts.
    """
    import ray

    if not ray.is_initialized():
        _connect(address, num_cpus, log_to_driver, need)
    if need is not None:
        check_cpu_budget(need)


def _connect(address: str | None, num_cpus: int | None, log_to_driver: bool, need: CpuNeed | None) -> None:
    import ray

    env_addr = os.environ.get("RAY_ADDRESS")
    addr = env_addr or address
    if addr == "local":  # a fresh local instance, sized and bound as below
        addr = env_addr = None
    if addr == "auto" and not env_addr:
        try:
            ray.init(address="auto", log_to_driver=log_to_driver, configure_logging=False)
            return
        except ConnectionError:
            log.info("no running Ray cluster found: starting a local one")
    elif addr:
        ray.init(address=addr, log_to_driver=log_to_driver, configure_logging=False)
        return
    if num_cpus is not None and need is not None and (num_cpus + 1e-9 < need.total or num_cpus + 1e-9 < need.per_node):
        raise _budget_error(need, num_cpus, f"the local Ray (num_cpus={num_cpus})",
                            "raise num_cpus / --num-cpus (or leave it unset: raysemiseg then reserves "
                            "the workers' CPUs plus one for Ray Data)")
    ray.init(address="local", num_cpus=num_cpus or local_cpu_default(need), include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
             configure_logging=False, runtime_env={"env_vars": worker_env_vars()})
