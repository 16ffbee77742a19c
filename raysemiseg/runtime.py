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
import os

log = logging.getLogger(__name__)


def local_cpu_default() -> int:
    """Logical CPUs of a local Ray started without ``num_cpus``: max(cores, 2)."""
    return max(os.cpu_count() or 1, 2)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Connect to Ray once per process.

    Order: an already initialised Ray (kept as it is); ``$RAY_ADDRESS`` (set by ``ray job submit``)
    or an explicit ``address``; ``address="auto"`` joins a running cluster when there is one and
    falls back to a local one; otherwise a fresh local instance (``address="local"``: never a
    cluster that happens to run on this machine) bound to 127.0.0.1, with the dashboard (State API)
    on 127.0.0.1 and ``num_cpus`` logical CPUs (default :func:`local_cpu_default`).

    Args:
        address: a Ray address, ``"auto"``, or None (local unless ``$RAY_ADDRESS``).
        num_cpus: logical CPUs of a local instance (ignored when joining a cluster).
        log_to_driver: stream worker logs to this process.

    Raises:
        ConnectionError: an explicit (non-"auto") address could not be reached.
    """
    import ray

    if ray.is_initialized():
        return
    env_addr = os.environ.get("RAY_ADDRESS")
    addr = env_addr or address
    if addr == "auto" and not env_addr:
        try:
            ray.init(address="auto", log_to_driver=log_to_driver, configure_logging=False)
            return
        except ConnectionError:
            log.info("no running Ray cluster found: starting a local one")
    elif addr:
        ray.init(address=addr, log_to_driver=log_to_driver, configure_logging=False)
        return
    ray.init(address="local", num_cpus=num_cpus or local_cpu_default(), include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
             configure_logging=False)
