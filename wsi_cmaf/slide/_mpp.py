"""µm/px resolution chain and TIFF-level facts read directly with tifffile.

Order (issue §2): explicit override > vendor property > TIFF X/YResolution with a
centimetre/inch ResolutionUnit > objective power (logged warning) > named error.
Never guess silently.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from wsi_cmaf.errors import ConfigError, MissingResolutionError

logger = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: µm per ResolutionUnit (TIFF 6.0: 2 = inch, 3 = centimetre; 1 = no absolute unit).
_UNIT_UM = {2: 25_400.0, 3: 10_000.0}
#: µm/px at 1x; 40x ~= 0.25 µm/px, 20x ~= 0.5 µm/px (a convention, not a measurement).
_UM_AT_1X = 10.0


@dataclass(frozen=True)
class TiffFacts:
    """What tifffile says about the main image of a TIFF (level 0 of series 0)."""

    resolution_mpp: tuple[float, float] | None
    dtype: str
    samples: int
    photometric: str


def is_tiff(path: Path) -> bool:
    """True when the file starts with a (Big)TIFF header."""
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def tiff_facts(path: Path) -> TiffFacts | None:
    """Read resolution tags and pixel format of a TIFF's level 0; None if not parseable."""
    import tifffile

    if not is_tiff(path):
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.series[0].levels[0].keyframe if tf.series else tf.pages[0]
            tags = page.tags
            mpp = _resolution_mpp(tags)
            samples = int(page.samplesperpixel)
            return TiffFacts(
                resolution_mpp=mpp,
                dtype=str(page.dtype),
                samples=samples,
                photometric=getattr(page.photometric, "name", str(page.photometric)),
            )
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        logger.debug("tifffile could not parse %s: %s", path, exc)
        return None


def _resolution_mpp(tags: object) -> tuple[float, float] | None:
    unit_tag = tags.get("ResolutionUnit")  # type: ignore[attr-defined]
    xres, yres = tags.get("XResolution"), tags.get("YResolution")  # type: ignore[attr-defined]
    if unit_tag is None or xres is None or yres is None:
        return None
    unit_um = _UNIT_UM.get(int(unit_tag.value))
    if unit_um is None:
        return None
    out = []
    for tag in (xres, yres):
        value = tag.value
        px_per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
        if not (px_per_unit > 0 and math.isfinite(px_per_unit)):
            return None
        out.append(unit_um / px_per_unit)
    # Writers that leave the default 72 dpi (352.8 µm/px) did not mean it; treat any
    # value coarser than 100 µm/px as "no resolution" rather than trusting it.
    if max(out) > 100.0:
        return None
    return out[0], out[1]


def normalise_override(mpp: float | tuple[float, float] | None) -> tuple[float, float] | None:
    """Validate an ``mpp=`` override; a single number means isotropic pixels."""
    if mpp is None:
        return None
    try:
        pair = (float(mpp), float(mpp)) if not isinstance(mpp, (tuple, list)) else tuple(map(float, mpp))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"mpp override {mpp!r} is not a number or an (x, y) pair") from exc
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ConfigError(f"mpp override {mpp!r} must be one or two positive µm/px values")
    return pair[0], pair[1]


def resolve_mpp(
    path: Path,
    override: tuple[float, float] | None,
    vendor_mpp: tuple[float, float] | None,
    tiff_mpp: tuple[float, float] | None,
    objective_power: float | None,
) -> tuple[tuple[float, float], str]:
    """Return ``((x, y) µm/px, source)`` following the chain, or raise MissingResolutionError."""
    if override is not None:
        return override, "override"
    if vendor_mpp is not None:
        return vendor_mpp, "vendor"
    if tiff_mpp is not None:
        return tiff_mpp, "tiff-resolution"
    if objective_power is not None:
        value = _UM_AT_1X / objective_power
        logger.warning(
            "%s: no µm/px in the file; estimating %.4g µm/px from objective power %gx. "
            "Pass mpp= to be exact.", path, value, objective_power,
        )
        return (value, value), "objective-power"
    raise MissingResolutionError(
        path,
        "no µm/px resolution found (no vendor property, no TIFF resolution tags, no objective "
        "power); pass the scanner's value with the mpp= override "
        "(e.g. open_slide(path, mpp=0.25) or `--mpp 0.25`)",
    )
