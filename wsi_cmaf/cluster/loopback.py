"""Dask clusters on this machine that listen on 127.0.0.1 only, with no dashboard unless asked.

Every dask scheduler and worker runs an HTTP server (health and metrics routes) even when its
dashboard is off. Given no address, that server binds every interface: ``":0"`` means 0.0.0.0,
and an in-process (``inproc://``) cluster has no IP to take one from, so ``dashboard_address=None``
still opened 0.0.0.0:8787 (and a second 0.0.0.0 port for the worker). Dashboards show slide
file names, which in hospitals often carry patient identifiers, so every HTTP address is given
here, on loopback and port 0 (two analyses at once never fight over 8787).
"""

from __future__ import annotations

from typing import Any

from distributed import Client, Nanny, Worker

__all__ = ["loopback_options", "in_process_client", "NoDashboardNanny", "NoDashboardWorker"]

LOOPBACK_HTTP = "127.0.0.1:0"


class NoDashboardWorker(Worker):
    """A worker whose HTTP server keeps its routes but not the Bokeh dashboard.

    LocalCluster turns a worker's dashboard on whenever it is given an HTTP address, and the
    address is what keeps that server on loopback.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["dashboard"] = False
        super().__init__(*args, **kwargs)


class NoDashboardNanny(Nanny):
    """A Nanny whose worker process runs without the Bokeh dashboard (see :class:`NoDashboardWorker`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["dashboard"] = False
        super().__init__(*args, **kwargs)


def loopback_options(dashboard: bool = False, *, processes: bool = True) -> dict[str, Any]:
    """LocalCluster keyword arguments binding only 127.0.0.1; the dashboard only with ``dashboard``."""
    opts: dict[str, Any] = dict(dashboard_address=LOOPBACK_HTTP, scheduler_kwargs={"dashboard": dashboard},
                                worker_dashboard_address=LOOPBACK_HTTP)
    if processes:
        opts.update(host="127.0.0.1", worker_class=Nanny if dashboard else NoDashboardNanny)
    else:  # inproc:// has no host to give; its HTTP servers get theirs above
        opts.update(worker_class=Worker if dashboard else NoDashboardWorker)
    return opts


def in_process_client(threads: int, dashboard: bool = False) -> Client:
    """A client on a one-worker, in-process cluster (threads only, no pickling), on loopback."""
    return Client(processes=False, n_workers=1, threads_per_worker=threads, set_as_default=False,
                  **loopback_options(dashboard, processes=False))
