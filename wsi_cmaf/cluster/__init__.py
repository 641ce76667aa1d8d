"""Batch processing of slide archives on dask.distributed (local, scheduler address, SLURM/PBS).

Exports load on first use (PEP 562) so importing a submodule does not start with distributed.
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

_EXPORTS = {
    "BatchResult": "wsi_cmaf.cluster.plan",
    "analyze_slides": "wsi_cmaf.cluster.batch",
    "connect": "wsi_cmaf.cluster.engine",
    "make_jobqueue_cluster": "wsi_cmaf.cluster.jobqueue",
    "SlideJob": "wsi_cmaf.cluster.inputs",
    "collect_slides": "wsi_cmaf.cluster.inputs",
}

__all__ = ["BatchResult", "SlideJob", "analyze_slides", "collect_slides", "connect", "make_jobqueue_cluster"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
