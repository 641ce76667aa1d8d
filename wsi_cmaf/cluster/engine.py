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

from distributed import Client, LocalCluster

from wsi_cmaf.errors import ConfigError

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
    kwargs.setdefault("dashboard_address", ":0")
    common = dict(threads_per_worker=slides_per_gpu, resources={"GPU": slides_per_gpu}, **kwargs)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        logger.info("dask-cuda not installed; pinning one worker per GPU with LocalCluster worker env")
        return PerGPULocalCluster(devices, processes=True, **common)
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), **common)


def make_jobqueue_cluster(kind: str, *, gpus_per_job: int = 0, slides_per_gpu: int = 1, **kwargs: Any):
    """A dask-jobqueue SLURM or PBS cluster (not started until scaled).

    ``gpus_per_job`` > 0 asks the batch system for GPUs and advertises a ``GPU`` worker
    resource of ``gpus_per_job * slides_per_gpu``, so inference tasks (submitted with
    ``resources={"GPU": 1}``) land only there, ``slides_per_gpu`` of them per GPU at once.
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
        worker_args += ["--resources", f"GPU={gpus_per_job * slides_per_gpu}"]
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
    workers: int | None = None,
    threads_per_worker: int = 1,
    gpus_per_worker: int = 0,
    slides_per_gpu: int = 2,
    cluster_kwargs: dict[str, Any] | None = None,
) -> Iterator[Client]:
    """Yield a client: the given one, one connected to ``scheduler``, or one on a new cluster.

    ``cluster="local"`` with ``gpus_per_worker`` > 0 becomes ``"local-cuda"``: one worker per
    visible GPU (``workers`` of them at most). Clusters and clients this function creates are
    closed on exit; a given client is left open.
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
    if cluster == "local" and gpus_per_worker:
        cluster = "local-cuda"
    if cluster == "local-cuda":
        devices = extra.pop("devices", None)
        devices = [str(d) for d in (devices if devices is not None else visible_gpus())]
        cl = make_local_cuda_cluster(devices[:workers] if workers else devices,
                                     slides_per_gpu=slides_per_gpu, **extra)
    elif cluster == "local":
        cl = LocalCluster(n_workers=workers or 2, threads_per_worker=threads_per_worker, processes=True,
                          dashboard_address=extra.pop("dashboard_address", ":0"), **extra)
    else:
        cl = make_jobqueue_cluster(cluster, gpus_per_job=gpus_per_worker, slides_per_gpu=slides_per_gpu, **extra)
        cl.scale(jobs=workers or 2)
    try:
        with Client(cl) as c:
            if c.dashboard_link:
                logger.info("dask dashboard: %s", c.dashboard_link)
            yield c
    finally:
        cl.close()
