"""Getting a dask.distributed client: a LocalCluster, one worker per local GPU, an existing
scheduler, or SLURM/PBS via dask-jobqueue.

GPU workers advertise ``GPU = slides_per_gpu`` per GPU and every slide task asks for ``GPU: 1``,
with as many worker threads as slides in flight: several slides share a GPU, so one slide's CPU
stages (tissue mask, stain fit, decoding, writes, pictures) overlap another's model.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster

from wsi_cmaf.cluster.jobqueue import make_jobqueue_cluster  # noqa: F401  (re-exported)
from wsi_cmaf.cluster.loopback import loopback_options
from wsi_cmaf.errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "local-cuda", "slurm", "pbs")


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else torch's device count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def rotated(devices: Sequence[str], i: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` of worker ``i``: its own device first (it becomes ``cuda:0``)."""
    devs = [str(d) for d in devices]
    return ",".join(devs[i:] + devs[:i])


class PerGPULocalCluster(LocalCluster):
    """A LocalCluster with one worker process per GPU, each pinned by ``CUDA_VISIBLE_DEVICES``.

    The same pinning dask-cuda's ``LocalCUDACluster`` does (worker ``i`` sees device ``i`` first,
    so ``cuda:0`` is its own GPU), used when dask-cuda is not installed: LocalCUDACluster also
    queries NVML for device memory at start-up, so it cannot even be built without a GPU driver,
    and this class keeps the pinning testable on CPU machines (tests read each worker's env).
    """

    def __init__(self, devices: Sequence[str], **kwargs: Any) -> None:
        if not devices:
            raise ConfigError("one worker per GPU was asked for, but no GPU is visible")
        self.cuda_visible_devices = [str(d) for d in devices]
        # LocalCluster builds its first workers without new_worker_spec: start none, then scale
        # (which goes through new_worker_spec), as dask-cuda does.
        kwargs["n_workers"] = 0
        super().__init__(**kwargs)
        self.scale(len(self.cuda_visible_devices))
        self.sync(self._correct_state)

    def new_worker_spec(self) -> dict:
        """The next worker's spec: its name is its device, its env pins that device first."""
        free = [d for d in self.cuda_visible_devices if d not in self.worker_spec]
        if not free:
            raise ValueError("cannot start more workers than visible GPUs")
        name = free[0]
        spec = copy.deepcopy(self.new_spec)  # SpecCluster hands out one shared dict otherwise
        i = self.cuda_visible_devices.index(name)
        env = dict(spec["options"].get("env") or {})
        env["CUDA_VISIBLE_DEVICES"] = rotated(self.cuda_visible_devices, i)
        spec["options"]["env"] = env
        return {name: spec}


def make_local_cuda_cluster(devices: Sequence[str] | None = None, *, slides_per_gpu: int = 2,
                            **kwargs: Any):
    """One worker process per GPU: dask-cuda's LocalCUDACluster when importable, else
    :class:`PerGPULocalCluster`. Each worker runs ``slides_per_gpu`` slide tasks at once."""
    devices = [str(d) for d in (devices if devices is not None else visible_gpus())]
    if not devices:
        raise ConfigError("GPUs were requested (--cluster local-cuda or --gpus-per-worker) but no GPU "
                          "is visible (CUDA_VISIBLE_DEVICES / torch.cuda.device_count()); use --gpus-per-worker 0")
    dashboard = bool(kwargs.pop("dashboard", False))
    loopback = loopback_options(dashboard)
    common = dict(threads_per_worker=slides_per_gpu, resources={"GPU": slides_per_gpu}, **{**loopback, **kwargs})
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        logger.info("dask-cuda not installed; pinning one worker per GPU with LocalCluster worker env")
        return PerGPULocalCluster(devices, processes=True, **common)
    common.pop("worker_class")  # dask-cuda brings its own worker class
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), **common)


def _check_dashboard() -> None:
    """Refuse ``dashboard`` early when bokeh is missing: dask would serve a "needs bokeh" page
    instead (and from then on, in this process, on every scheduler it starts)."""
    try:
        import distributed.dashboard.scheduler  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"--dashboard needs bokeh>=3.1 ({exc}); pip install 'wsi-cmaf[dashboard]' "
                                     "or leave --dashboard out") from exc


@contextmanager
def connect(
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    threads_per_worker: int = 1,
    gpus_per_worker: int = 0,
    slides_per_gpu: int = 2,
    cluster_kwargs: dict[str, Any] | None = None,
    retries: int = 2,
    adapt: tuple[int, int] | None = None,
    dashboard: bool = False,
    lifetime: str | int | None = "auto",
    lifetime_stagger: str | int | None = None,
) -> Iterator[Client]:
    """Yield a client: the given one, one connected to ``scheduler``, or one on a new cluster.

    ``cluster="local"`` with ``gpus_per_worker`` > 0 becomes ``"local-cuda"``: one worker per
    visible GPU (``workers`` of them at most). Local clusters bind 127.0.0.1 only and start a
    dashboard (on 127.0.0.1) only with ``dashboard``. A slide whose worker is lost is run again
    elsewhere, ``retries`` times at most (the scheduler's ``allowed-failures``). SLURM/PBS
    clusters use TLS and keep ``workers`` jobs (or between ``adapt`` = (min, max) jobs) running,
    replacing any job that ends early. Clusters and clients this function creates are closed on
    exit; a given client is left open.
    """
    if client is not None:
        yield client
        return
    if dashboard:
        _check_dashboard()
    if scheduler:
        with Client(scheduler) as c:
            yield c
        return
    if cluster not in CLUSTER_KINDS:
        raise ConfigError(f"unknown cluster {cluster!r}; choose one of {CLUSTER_KINDS}")
    extra = dict(cluster_kwargs or {})
    if cluster == "local" and gpus_per_worker:
        cluster = "local-cuda"
    # The scheduler reads allowed-failures when it is built (here, in this process); a job-queue
    # cluster reads lost-worker-timeout each time a job's worker leaves, before replacing the job.
    settings = {"distributed.scheduler.allowed-failures": max(0, int(retries)),
                "distributed.deploy.lost-worker-timeout": "5s"}
    with dask.config.set(settings):
        if cluster == "local-cuda":
            devices = extra.pop("devices", None)
            devices = [str(d) for d in (devices if devices is not None else visible_gpus())]
            cl = make_local_cuda_cluster(devices[:workers] if workers else devices,
                                         slides_per_gpu=slides_per_gpu, dashboard=dashboard, **extra)
        elif cluster == "local":
            opts = {**loopback_options(dashboard), **extra}
            cl = LocalCluster(n_workers=workers or 2, threads_per_worker=threads_per_worker, processes=True, **opts)
        else:
            cl = make_jobqueue_cluster(cluster, gpus_per_job=gpus_per_worker, slides_per_gpu=slides_per_gpu,
                                       dashboard=dashboard, lifetime=lifetime, lifetime_stagger=lifetime_stagger,
                                       **extra)
            lo, hi = adapt if adapt else (workers or 2, workers or 2)
            # Adaptive, even at a fixed size: it starts a new job for each one that ended (walltime,
            # preemption, scancel); a plain scale() would leave the cluster short.
            cl.adapt(minimum_jobs=lo, maximum_jobs=hi, interval="1s", wait_count=5)
        try:
            with Client(cl, security=getattr(cl, "security", None)) as c:
                if dashboard and c.dashboard_link:
                    logger.info("dask dashboard: %s", c.dashboard_link)
                yield c
        finally:
            cl.close()
