"""One slide's quality-control report: µm/px check, ink, out-of-focus tiles; its JSON and store group.

The report's JSON keys (``wsi-cmaf qc``, the store's ``qc`` group and the analysis summary):
``mpp_metadata`` (what the file says, null when nothing), ``mpp_used`` and ``mpp_source``,
``mpp_estimate`` / ``mpp_estimate_interval`` / ``mpp_estimate_nuclei`` / ``mpp_estimate_confident``
(null when the check was off or impossible), ``ink_fraction`` (of tissue + ink), ``ink_area_mm2``,
``ink_tiles`` (tiles left out because they are mostly ink), ``tissue_tiles``, ``judged_tiles``,
``blurred_tiles``, ``blur_threshold``, ``median_sharpness``, ``blur_excluded`` and ``warnings``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_cmaf.errors import MppEstimateError
from wsi_cmaf.qc import blur
from wsi_cmaf.qc.mpp_estimate import ESTIMATED_SOURCE, MppEstimate, estimate_mpp, mpp_disagreement
from wsi_cmaf.slide.grid import TileGrid
from wsi_cmaf.slide.reader import SlideReader
from wsi_cmaf.slide.tissue import TissueMask

logger = logging.getLogger(__name__)

#: tiles sampled for the µm/px check of a slide that has metadata (the check must stay cheap)
CHECK_TILES = 8
#: the store group of the report
GROUP = "qc"


@dataclass
class SlideQC:
    """What the QC of one slide found; :meth:`to_dict` is the JSON report."""

    mpp_metadata: tuple[float, float] | None
    mpp_used: tuple[float, float]
    mpp_source: str | None
    estimate: MppEstimate | None
    ink_fraction: float
    ink_area_mm2: float
    ink_tiles: np.ndarray
    sharpness: np.ndarray
    tissue: np.ndarray
    blur_excluded: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def blurred(self) -> np.ndarray:
        """Tissue tiles flagged as out of focus (bool, grid shape)."""
        return blur.blurred_tiles(self.sharpness) & self.tissue

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (keys in the module text)."""
        est = self.estimate
        out: dict[str, Any] = {
            "mpp_metadata": None if self.mpp_metadata is None else [round(float(v), 6) for v in self.mpp_metadata],
            "mpp_used": [round(float(v), 6) for v in self.mpp_used],
            "mpp_source": self.mpp_source,
            "mpp_estimate": None if est is None else round(est.mpp, 4),
            "mpp_estimate_interval": None if est is None else [round(v, 4) for v in est.interval],
            "mpp_estimate_nuclei": None if est is None else est.n_nuclei,
            "mpp_estimate_confident": None if est is None else est.confident,
            "ink_fraction": round(float(self.ink_fraction), 5),
            "ink_area_mm2": round(float(self.ink_area_mm2), 4),
            "ink_tiles": int(self.ink_tiles.sum()),
        }
        out.update(blur.summary(self.sharpness, self.tissue))
        out["blur_excluded"] = bool(self.blur_excluded)
        out["warnings"] = list(self.warnings)
        return out


def metadata_mpp(reader: SlideReader) -> tuple[float, float] | None:
    """The µm/px the file itself states (None when it states none or the user overrode it)."""
    if reader.mpp_source == ESTIMATED_SOURCE:
        return getattr(reader, "metadata_mpp", None)
    if reader.mpp_source in (None, "override"):
        return None
    return reader.mpp


def check_mpp(reader: SlideReader, *, check: bool = True,
              tissue: TissueMask | None = None) -> tuple[MppEstimate | None, list[str]]:
    """(estimate, warnings): the estimate ``reader`` was opened with, or a cheap one to check its µm/px against."""
    warnings: list[str] = []
    est = getattr(reader, "mpp_estimate", None)
    if est is not None:
        if not est.confident:
            warnings.append(f"the µm/px was estimated from only {est.n_nuclei} nucleus-like objects: "
                            "low confidence; pass the scanner's value with --mpp")
        meta = metadata_mpp(reader)
        if meta is not None and (message := mpp_disagreement(meta, est)):
            warnings.append(message)
        return est, warnings
    if not check:
        return None, warnings
    try:
        est = estimate_mpp(reader, n_tiles=CHECK_TILES, tissue=tissue)
    except MppEstimateError as exc:  # an image without nuclei says nothing against its metadata
        logger.info("µm/px check skipped: %s", exc)
        return None, warnings
    # an uncertain estimate warns nobody about a value that may well be right
    if est.confident and (message := mpp_disagreement(reader.mpp, est)):
        warnings.append(message)
    return est, warnings


def run_qc(reader: SlideReader, grid: TileGrid, mask: TissueMask, *, mpp_check: bool = True,
           pixels: SlideReader | None = None) -> SlideQC:
    """QC of one slide on ``grid`` with ``mask`` (ink already excluded by the tissue stage).

    ``pixels``: the reader that decodes tiles (default ``reader``); sharpness is measured on a
    lattice of ``grid``'s tissue tiles and around every tile found out of focus there
    (:data:`~wsi_cmaf.qc.blur.FOCUS_SPACING_UM`).
    """
    est, warnings = check_mpp(reader, check=mpp_check, tissue=mask)
    for message in warnings:
        logger.warning("%s: %s", reader.path.name, message)
    sharp = blur.tile_sharpness(pixels or reader, grid, spacing_um=blur.FOCUS_SPACING_UM)
    ink_px = int(np.count_nonzero(mask.ink)) if mask.ink is not None else 0
    qc = SlideQC(mpp_metadata=metadata_mpp(reader), mpp_used=reader.mpp, mpp_source=reader.mpp_source,
                 estimate=est, ink_fraction=mask.ink_fraction(), ink_area_mm2=ink_px * mask.mpp ** 2 / 1e6,
                 ink_tiles=np.asarray(grid.ink_tiles, bool).copy(), sharpness=sharp, tissue=grid.tissue.copy(),
                 warnings=warnings)
    n_blur, n_ink = int(qc.blurred.sum()), int(qc.ink_tiles.sum())
    if n_blur:
        qc.warnings.append(f"{n_blur} of {int(grid.tissue.sum())} tissue tiles look out of focus "
                           f"(sharpness < {blur.BLUR_THRESHOLD})")
    if n_ink:
        qc.warnings.append(f"{n_ink} tile(s) are mostly marker ink and are not analysed")
    return qc


def write_store(store: Any, qc: SlideQC) -> None:
    """The report into ``store`` as the ``qc`` group: ``blur`` (uint8 flags), ``sharpness``
    (float32), ``ink_tiles`` (uint8), all in grid shape, and the JSON report as its ``report`` attribute."""
    from zarr.codecs import BloscCodec

    root = store._root
    group = root.require_group(GROUP)
    for name, data in (("blur", qc.blurred.astype(np.uint8)), ("sharpness", qc.sharpness.astype(np.float32)),
                       ("ink_tiles", qc.ink_tiles.astype(np.uint8))):
        arr = group.create_array(name, shape=data.shape, chunks=tuple(max(1, min(n, 2048)) for n in data.shape),
                                 dtype=data.dtype, compressors=BloscCodec(cname="zstd", clevel=3),
                                 overwrite=True, dimension_names=("y", "x"))
        arr[...] = data
    group.attrs["report"] = qc.to_dict()


def read_store(store: Any) -> dict[str, Any] | None:
    """{"report", "blur", "sharpness", "ink_tiles"} of a store's ``qc`` group; None when it has none."""
    root = store._root
    if GROUP not in root:
        return None
    group = root[GROUP]
    out: dict[str, Any] = {"report": dict(group.attrs.get("report", {}))}
    for name in ("blur", "sharpness", "ink_tiles"):
        out[name] = np.asarray(group[name][...]) if name in group else None
    return out


def status_fields(result: Any) -> dict[str, Any]:
    """The QC columns of a batch's status.csv (``wsi_cmaf.cluster.status.QC_COLUMNS``) for one
    analysis result (blank where the QC did not run).

    ``mpp_ratio`` is the µm/px used over the estimate: near 1 when they agree, about 2 or 0.5 for
    a slide labelled with the other objective's value.
    """
    qc = getattr(result, "qc", None) or {}
    mpp = float(result.mpp[0]) if getattr(result, "mpp", None) else None
    est = qc.get("mpp_estimate")
    return {"mpp": "" if mpp is None else round(mpp, 5), "mpp_source": getattr(result, "mpp_source", "") or "",
            "mpp_estimate": "" if est is None else est,
            "mpp_ratio": "" if est is None or mpp is None else round(mpp / est, 3),
            "ink_fraction": qc.get("ink_fraction", ""), "blurred_tiles": qc.get("blurred_tiles", "")}
