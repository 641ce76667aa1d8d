"""Opening a slide, µm/px estimate included: :func:`open_slide` (also ``wsi_cmaf.slide.open_slide``).

:func:`wsi_cmaf.slide.reader.open_slide` takes the µm/px from the file or from a number given;
``mpp="estimate"`` measures it from the nuclei in the image (:mod:`wsi_cmaf.qc.mpp_estimate`),
which reads tissue through an open reader, so that step sits here, one layer above the reader.
"""

from __future__ import annotations

from pathlib import Path

from wsi_cmaf.qc.mpp_estimate import ESTIMATED_SOURCE, estimate_mpp
from wsi_cmaf.slide import reader as _reader
from wsi_cmaf.slide.reader import SlideReader


def open_slide(
    path: str | Path,
    backend: str = "auto",
    mpp: float | tuple[float, float] | str | None = None,
) -> SlideReader:
    """Open a whole-slide image (as :func:`wsi_cmaf.slide.reader.open_slide`).

    ``mpp``: level-0 µm/px override (one value or ``(x, y)``), which always wins over metadata;
    or ``"estimate"``: measured from the nuclei in the image instead (``mpp_source`` is then
    "estimated from nuclei", :class:`~wsi_cmaf.errors.MppEstimateError` when it cannot be).
    """
    if not (isinstance(mpp, str) and mpp.strip().lower() == "estimate"):
        return _reader.open_slide(path, backend, mpp)
    reader = _reader.open_slide(path, backend, None)
    try:
        reader.use_mpp_estimate(estimate_mpp(reader), ESTIMATED_SOURCE)
    except BaseException:
        reader.close()
        raise
    return reader
