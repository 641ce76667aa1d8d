"""Batch processing of slide archives on dask.distributed (local, scheduler address, SLURM/PBS).

Exports load on first use (PEP 562) so importing a submodule does not start with distributed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BatchResult": "wsi_cmaf.cluster.batch",
    "analyze_slides": "wsi_cmaf.cluster.batch",
    "connect": "wsi_cmaf.cluster.engine",
    "make_jobqueue_cluster": "wsi_cmaf.cluster.engine",
    "SlideJob": "wsi_cmaf.cluster.inputs",
    "collect_slides": "wsi_cmaf.cluster.inputs",
}

__all__ = ["BatchResult", "SlideJob", "analyze_slides", "collect_slides", "connect", "make_jobqueue_cluster"]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
