"""Getting a dask.distributed client: a LocalCluster, an existing scheduler, or SLURM/PBS via dask-jobqueue."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

from distributed import Client, LocalCluster

from wsi_cmaf.errors import ConfigError

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "slurm", "pbs")


def make_jobqueue_cluster(kind: str, *, gpus_per_job: int = 0, **kwargs: Any):
    """A dask-jobqueue SLURM or PBS cluster (not started until scaled).

    ``gpus_per_job`` > 0 asks the batch system for GPUs and advertises a ``GPU`` worker
    resource, so inference tasks (submitted with ``resources={"GPU": 1}``) land only there.
    Other keyword arguments go to the dask-jobqueue class (cores, memory, queue, account,
    walltime, job_extra_directives, ...); anything left out comes from dask's jobqueue config.
    """
    import dask_jobqueue

    if kind not in ("slurm", "pbs"):
        raise ConfigError(f"unknown job-queue cluster kind {kind!r}; use 'slurm' or 'pbs'")
    directives = list(kwargs.pop("job_extra_directives", []) or [])
    worker_args = list(kwargs.pop("worker_extra_args", []) or [])
    if gpus_per_job:
        directives.append(f"--gres=gpu:{gpus_per_job}" if kind == "slurm" else f"-l ngpus={gpus_per_job}")
        worker_args += ["--resources", f"GPU={gpus_per_job}"]
    cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    kwargs.setdefault("cores", 4)
    kwargs.setdefault("memory", "16GiB")
    kwargs.setdefault("processes", 1)
    return cls(job_extra_directives=directives, worker_extra_args=worker_args, **kwargs)


@contextmanager
def connect(
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    cluster: str = "local",
    workers: int = 2,
    threads_per_worker: int = 1,
    gpus_per_worker: int = 0,
    cluster_kwargs: dict[str, Any] | None = None,
) -> Iterator[Client]:
    """Yield a client: the given one, one connected to ``scheduler``, or one on a new cluster.

    Clusters and clients this function creates are closed on exit; a given client is left open.
    """
    if client is not None:
        yield client
        return
    if scheduler:
        with Client(scheduler) as c:
            yield c
        return
    if cluster not in CLUSTER_KINDS:
        raise ConfigError(f"unknown cluster {cluster!r}; choose one of {CLUSTER_KINDS}")
    extra = dict(cluster_kwargs or {})
    if cluster == "local":
        resources = {"GPU": gpus_per_worker} if gpus_per_worker else None
        cl = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                          resources=resources, dashboard_address=extra.pop("dashboard_address", ":0"),
                          **extra)
    else:
        cl = make_jobqueue_cluster(cluster, gpus_per_job=gpus_per_worker, **extra)
        cl.scale(jobs=workers)
    try:
        with Client(cl) as c:
            if c.dashboard_link:
                logger.info("dask dashboard: %s", c.dashboard_link)
            yield c
    finally:
        cl.close()
