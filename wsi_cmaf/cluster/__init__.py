"""Batch processing of slide archives on dask.distributed (local, scheduler address, SLURM/PBS)."""

from wsi_cmaf.cluster.batch import BatchResult, analyze_slides
from wsi_cmaf.cluster.engine import connect, make_jobqueue_cluster
from wsi_cmaf.cluster.inputs import SlideJob, collect_slides

__all__ = ["BatchResult", "SlideJob", "analyze_slides", "collect_slides", "connect", "make_jobqueue_cluster"]
