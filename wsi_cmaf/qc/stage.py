"""The QC stage of ``analyze_slide``: measured on the analysis grid, stored under ``qc/`` and in the summary."""

from __future__ import annotations

import logging
from typing import Any

from wsi_cmaf.qc.report import SlideQC, run_qc, write_store

logger = logging.getLogger(__name__)


def qc_before_inference(reader: Any, pixels: Any, grid: Any, mask: Any, cfg: Any, timer: Any,
                        warn: list[str]) -> SlideQC | None:
    """Run the slide QC (``cfg.qc``); with ``cfg.exclude_blurred`` the blurred tiles leave ``grid``.

    Its warnings join ``warn``. A resumed run measures again (it costs a fraction of the
    analysis) and so excludes the same tiles.
    """
    if not getattr(cfg, "qc", True):
        return None
    with timer("qc"):
        # OpenSlide, when it opened the slide, rather than the block reader: it decodes small windows
        # of JPEG 2000 slides ~1.5x faster than tiffslide, which block reads prefer for large regions
        windows = reader if reader.backend == "openslide" else pixels
        qc = run_qc(reader, grid, mask, mpp_check=getattr(cfg, "mpp_check", True), pixels=windows)
    if getattr(cfg, "exclude_blurred", False):
        blurred = qc.blurred
        grid.exclude(blurred)
        qc.blur_excluded = True
        if blurred.any():
            logger.info("%d out-of-focus tiles left out of the analysis", int(blurred.sum()))
    warn.extend(qc.warnings)
    return qc


def qc_into_store(store: Any, qc: SlideQC | None) -> None:
    """Write the report into the store's ``qc`` group (before the overlay, which draws it)."""
    if qc is not None:
        write_store(store, qc)


def qc_summary(qc: SlideQC | None) -> dict[str, Any]:
    """The report for the summary JSON ({} when the QC was off)."""
    return {} if qc is None else qc.to_dict()


def qc_identity(cfg: Any) -> dict[str, Any]:
    """What the QC adds to a store's resume identity: whether blurred tiles are left out (another set
    of analysed tiles). ``cfg`` None or without the option: none are."""
    return {"exclude_blurred": bool(getattr(cfg, "exclude_blurred", False))}
