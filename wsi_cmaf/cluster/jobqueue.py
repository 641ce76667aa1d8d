"""SLURM and PBS clusters through dask-jobqueue: TLS, worker lifetimes, GPUs, the project's Python.

A batch scheduler's workers run on other machines, so the scheduler must listen beyond loopback.
It then speaks TLS with credentials made for the run (``Security.temporary()``): a process
without them cannot connect, and nobody who merely reaches the port can run code as the user.

Jobs end at their walltime, or earlier when preempted. Workers retire before the walltime
(dask's ``--lifetime``, staggered so they do not all leave at once) and the cluster is kept at
its size by dask's adaptive scaling, which starts a job for every one that left.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from wsi_cmaf.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["make_jobqueue_cluster", "walltime_seconds", "lifetime_for_walltime", "worker_python_prologue"]


def walltime_seconds(walltime: str) -> int:
    """Seconds of a SLURM/PBS walltime: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    text = str(walltime).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"walltime {walltime!r} is not [D-]HH:MM:SS, MM:SS or minutes")
    a = int(m.group(2))  # the one number every form has
    days, b, c = (int(g) if g is not None else None for g in m.group(1, 3, 4))
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = a, b or 0, c or 0
        total = days * 86400 + h * 3600 + mi * 60 + s
    elif b is None:  # minutes
        total = a * 60
    elif c is None:  # MM:SS
        total = a * 60 + b
    else:
        total = a * 3600 + b * 60 + c
    if total <= 0:
        raise ConfigError(f"walltime {walltime!r} is not positive")
    return total


def lifetime_for_walltime(walltime: str) -> tuple[int, int]:
    """(lifetime, stagger) in seconds for workers of jobs with this walltime.

    Workers must be gone before the batch system kills the job. The margin before the walltime
    is 10 % of it, at least 5 minutes (a slide in flight and the worker's shutdown), at most
    half of it; the stagger is 5 % of the walltime, at most half the margin, so the latest
    retirement (lifetime + stagger) still leaves half the margin.
    """
    w = walltime_seconds(walltime)
    margin = min(max(w // 10, 300), w // 2)
    stagger = min(w // 20, margin // 2)
    return w - margin, stagger


def worker_python_prologue(python: str | None = None) -> list[str]:
    """Job-script lines that make the job run this project's Python and find its code.

    ``PYTHONPATH`` is extended, never replaced: a site's own entries stay in front of nothing.
    """
    import wsi_cmaf

    src = str(Path(wsi_cmaf.__file__).resolve().parents[1])
    lines = [f'export PYTHONPATH={shlex.quote(src)}"${{PYTHONPATH:+:$PYTHONPATH}}"']
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and python is None:
        lines.append(f"export PATH={shlex.quote(str(Path(venv) / 'bin'))}:\"$PATH\"")
    return lines


def make_jobqueue_cluster(kind: str, *, gpus_per_job: int = 0, slides_per_gpu: int = 1, dashboard: bool = False,
                          security: Any = True, lifetime: str | int | None = "auto",
                          lifetime_stagger: str | int | None = None, **kwargs: Any):
    """A dask-jobqueue SLURM or PBS cluster (not started until scaled).

    ``gpus_per_job`` > 0 asks the batch system for GPUs and advertises a ``GPU`` worker
    resource of ``gpus_per_job * slides_per_gpu``, so inference tasks (submitted with
    ``resources={"GPU": 1}``) land only there, ``slides_per_gpu`` of them per GPU at once.
    ``security``: True makes TLS credentials for this run (``Security.temporary()``), a
    ``distributed.Security`` is used as given, None/False means plain TCP (refused unless the
    scheduler binds loopback only). ``lifetime``: "auto" derives worker ``--lifetime`` and
    ``--lifetime-stagger`` from the walltime (:func:`lifetime_for_walltime`); None turns it off;
    else seconds or a dask duration. ``dashboard`` starts the scheduler's dashboard, on loopback.
    Other keyword arguments go to the dask-jobqueue class (cores, memory, queue, account,
    walltime, job_extra_directives, ...); anything left out comes from dask's jobqueue config.
    """
    import dask
    import dask_jobqueue
    from distributed.security import Security

    if kind not in ("slurm", "pbs"):
        raise ConfigError(f"unknown job-queue cluster kind {kind!r}; use 'slurm' or 'pbs'")
    directives = list(kwargs.pop("job_extra_directives", []) or [])
    worker_args = list(kwargs.pop("worker_extra_args", []) or [])
    prologue = list(kwargs.pop("job_script_prologue", []) or [])
    if gpus_per_job:
        directives.append(f"--gres=gpu:{gpus_per_job}" if kind == "slurm" else f"-l ngpus={gpus_per_job}")
        worker_args += ["--resources", f"GPU={gpus_per_job * slides_per_gpu}"]
    kwargs.setdefault("cores", 4)
    kwargs.setdefault("memory", "16GiB")
    kwargs.setdefault("processes", 1)
    kwargs.setdefault("python", sys.executable)
    walltime = kwargs.get("walltime") or dask.config.get(f"jobqueue.{kind}.walltime", None)
    if lifetime == "auto":
        lifetime, auto_stagger = lifetime_for_walltime(walltime) if walltime else (None, None)
        lifetime_stagger = auto_stagger if lifetime_stagger is None else lifetime_stagger
    if lifetime is not None:
        worker_args += ["--lifetime", _duration(lifetime)]
        if lifetime_stagger:
            worker_args += ["--lifetime-stagger", _duration(lifetime_stagger)]
    # The workers' HTTP endpoints (health, metrics) stay on the node's loopback.
    worker_args += ["--dashboard-address", "127.0.0.1:0"]
    if not dashboard:
        worker_args += ["--no-dashboard"]
    sched = dict(kwargs.pop("scheduler_options", {}) or {})
    sched.setdefault("dashboard_address", "127.0.0.1:0")
    sched.setdefault("dashboard", dashboard)
    if security is True:
        security = Security.temporary()
    if security:
        kwargs.setdefault("protocol", "tls://")
        kwargs["security"] = security
        configured = dask.config.get(f"jobqueue.{kind}.shared_temp_directory", None)
        if "shared_temp_directory" not in kwargs and not configured:
            kwargs["shared_temp_directory"] = os.path.expanduser("~")
    else:
        host = str(sched.get("host", ""))
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError("a job-queue scheduler without TLS must bind loopback only: pass security=True "
                              "(the default) or scheduler_options={'host': '127.0.0.1'}")
    cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    return cls(job_extra_directives=directives, worker_extra_args=worker_args,
               job_script_prologue=worker_python_prologue(kwargs.get("python")) + prologue,
               scheduler_options=sched, **kwargs)


def _duration(value: str | int | float) -> str:
    return f"{int(value)}s" if isinstance(value, int | float) else str(value)
