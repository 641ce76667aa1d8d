"""µm/px resolution chain and TIFF-level facts read directly with tifffile.

Order: explicit override > vendor property (as the opening backend
reports it) > vendor ImageDescription parsed here whatever backend opened the file (Aperio
``MPP``/``AppMag``, OME-XML ``PhysicalSizeX``, Philips ``DICOM_PIXEL_SPACING``) > TIFF
X/YResolution with a centimetre/inch ResolutionUnit > objective power (logged warning) >
named error. Never guess silently: the source is recorded (``mpp_source``) and a warning is
logged when two sources disagree.

Every value, from the user or from the file, must lie in :data:`MPP_RANGE`: an override
outside it is an :class:`~wsi_cmaf.errors.ImplausibleResolutionError`; a metadata value
outside it is ignored with a warning (a 72 dpi default or a typo in a scanner's
description would otherwise size thumbnails and grids).
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from wsi_cmaf.errors import ConfigError, ImplausibleResolutionError, MissingResolutionError

logger = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: µm per ResolutionUnit (TIFF 6.0: 2 = inch, 3 = centimetre; 1 = no absolute unit).
_UNIT_UM = {2: 25_400.0, 3: 10_000.0}
#: µm/px at 1x; 40x ~= 0.25 µm/px, 20x ~= 0.5 µm/px (a convention, not a measurement).
_UM_AT_1X = 10.0
#: Plausible level-0 µm/px: 0.05 (beyond any optical scanner) to 100 (a 1 mm slide would be 10 px).
MPP_RANGE = (0.05, 100.0)
#: Two measured sources further apart than this (relative) are reported as disagreeing.
_AGREE_RTOL = 0.05
#: Objective power is a convention (a 20x scanner may scan at 0.46-0.52 µm/px): wider tolerance.
_OBJECTIVE_RTOL = 0.30
#: Longest ImageDescription parsed (a fuzzed or malformed file may claim megabytes of text).
_MAX_DESCRIPTION = 1 << 20

_OME_SIZE = re.compile(r'PhysicalSize(?P<axis>[XY])="(?P<value>[^"]+)"')
_OME_UNIT = re.compile(r'PhysicalSize(?P<axis>[XY])Unit="(?P<unit>[^"]+)"')
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_PHILIPS_SPACING = re.compile(r'Name="DICOM_PIXEL_SPACING"[^>]*>\s*"?(?P<y>[0-9.eE+-]+)"?\s+"?(?P<x>[0-9.eE+-]+)"?')


@dataclass(frozen=True)
class TiffFacts:
    """What tifffile says about the main image of a TIFF (level 0 of series 0)."""

    resolution_mpp: tuple[float, float] | None
    dtype: str
    samples: int
    photometric: str
    #: µm/px parsed from the level-0 ImageDescription (any vendor format we know), if any
    description_mpp: tuple[float, float] | None = None
    #: objective power parsed from the ImageDescription (Aperio ``AppMag``), if any
    description_objective: float | None = None
    #: which description format gave them ('aperio', 'ome', 'philips'), if any
    description_format: str | None = None


def is_tiff(path: Path) -> bool:
    """True when the file starts with a (Big)TIFF header."""
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def tiff_facts(path: Path) -> TiffFacts | None:
    """Read resolution tags, description metadata and pixel format of a TIFF's level 0.

    None when tifffile cannot parse the file (a backend may still open it).
    """
    import tifffile

    if not is_tiff(path):
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.series[0].levels[0].keyframe if tf.series else tf.pages[0]
            tags = page.tags
            mpp = _resolution_mpp(tags)
            desc_tag = tf.pages[0].tags.get("ImageDescription")
            desc = desc_tag.value if desc_tag is not None else ""
            d_mpp, d_obj, d_fmt = parse_description(desc if isinstance(desc, str) else "")
            samples = int(page.samplesperpixel)
            return TiffFacts(
                resolution_mpp=mpp,
                dtype=str(page.dtype),
                samples=samples,
                photometric=getattr(page.photometric, "name", str(page.photometric)),
                description_mpp=d_mpp,
                description_objective=d_obj,
                description_format=d_fmt,
            )
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, ZeroDivisionError, struct.error) as exc:
        # tifffile reports malformed files with several exception types; the backends decide
        # whether the file opens at all, so this only loses the extra metadata
        logger.debug("tifffile could not parse %s: %s", path, exc)
        return None


def positive_float(value: object) -> float | None:
    """``value`` as a finite float > 0, or None (metadata values arrive as text, numbers or junk)."""
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def parse_description(desc: str) -> tuple[tuple[float, float] | None, float | None, str | None]:
    """(µm/px, objective power, format) from an ImageDescription; Nones where it says nothing.

    Formats: Aperio (``...|MPP = 0.499|AppMag = 20|...``; also written by other tools that
    OpenSlide then sees as generic TIFF), OME-XML (``PhysicalSizeX``/``Unit``) and Philips
    (``DICOM_PIXEL_SPACING`` in mm, y first).
    """
    desc = desc[:_MAX_DESCRIPTION]
    if "|" in desc and "=" in desc:
        fields = {}
        for part in desc.split("|"):
            key, sep, value = part.partition("=")
            if sep:
                fields[key.strip().lower()] = value.strip()
        mpp = positive_float(fields.get("mpp", ""))
        mag = positive_float(fields.get("appmag", ""))
        if mpp is not None or mag is not None:
            return ((mpp, mpp) if mpp else None), mag, "aperio"
    if "PhysicalSizeX" in desc:
        sizes = {m["axis"]: positive_float(m["value"]) for m in _OME_SIZE.finditer(desc)}
        units = {m["axis"]: m["unit"] for m in _OME_UNIT.finditer(desc)}
        size_x, size_y = sizes.get("X"), sizes.get("Y")
        scale_x, scale_y = (_OME_UNIT_UM.get(units.get(a, "µm")) for a in "XY")
        if size_x and size_y and scale_x and scale_y:
            return (size_x * scale_x, size_y * scale_y), None, "ome"
    m = _PHILIPS_SPACING.search(desc) if "DICOM_PIXEL_SPACING" in desc else None
    if m:
        x, y = positive_float(m["x"]), positive_float(m["y"])
        if x and y:
            return (x * 1000.0, y * 1000.0), None, "philips"
    return None, None, None


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
        if isinstance(value, tuple):
            px_per_unit = value[0] / value[1] if value[1] else float("nan")
        else:
            px_per_unit = float(value)
        if not (px_per_unit > 0 and math.isfinite(px_per_unit)):
            return None
        out.append(unit_um / px_per_unit)
    # Writers that leave the default 72 dpi (352.8 µm/px) did not mean it; treat any
    # value coarser than 100 µm/px as "no resolution" rather than trusting it.
    if max(out) > MPP_RANGE[1]:
        return None
    return out[0], out[1]


def _plausible(pair: tuple[float, float]) -> bool:
    return all(MPP_RANGE[0] <= v <= MPP_RANGE[1] for v in pair)


def normalise_override(mpp: float | tuple[float, float] | str | None) -> tuple[float, float] | None:
    """Validate an ``mpp=`` override; a single number (or its text) means isotropic pixels.

    Raises ConfigError for non-numbers and ImplausibleResolutionError (a ConfigError) for
    values outside :data:`MPP_RANGE`.
    """
    if mpp is None:
        return None
    try:
        pair = (float(mpp), float(mpp)) if not isinstance(mpp, (tuple, list)) else tuple(map(float, mpp))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"mpp override {mpp!r} is not a number or an (x, y) pair") from exc
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ConfigError(f"mpp override {mpp!r} must be one or two positive µm/px values")
    if not _plausible(pair):
        lo, hi = MPP_RANGE
        raise ImplausibleResolutionError(
            f"mpp override {mpp!r} µm/px is outside the plausible range {lo:g}-{hi:g} µm/px "
            f"(40x scans are ~0.25, 20x ~0.5); give level-0 micrometres per pixel, not a "
            f"magnification or a size in px")
    return pair[0], pair[1]


def _disagree(a: tuple[float, float], b: tuple[float, float], rtol: float) -> bool:
    return any(abs(x - y) > rtol * max(x, y) for x, y in zip(a, b))


def resolve_mpp(
    path: Path,
    override: tuple[float, float] | None,
    vendor_mpp: tuple[float, float] | None,
    tiff_mpp: tuple[float, float] | None,
    objective_power: float | None,
    description_mpp: tuple[float, float] | None = None,
) -> tuple[tuple[float, float], str]:
    """Return ``((x, y) µm/px, source)`` following the chain, or raise MissingResolutionError.

    Sources: 'override' | 'vendor' | 'description' | 'tiff-resolution' | 'objective-power'.
    Logs a warning when two sources disagree (the earlier one in the chain wins).
    """
    measured: list[tuple[str, tuple[float, float]]] = []
    for source, value in (("vendor", vendor_mpp), ("description", description_mpp),
                          ("tiff-resolution", tiff_mpp)):
        if value is None:
            continue
        if not _plausible(value):
            logger.warning("%s: ignoring the %s µm/px %s, outside the plausible range %g-%g",
                           path, source, value, *MPP_RANGE)
            continue
        measured.append((source, value))
    estimate: tuple[float, float] | None = None
    if objective_power is not None:
        power_mpp = _UM_AT_1X / objective_power
        if _plausible((power_mpp, power_mpp)):
            estimate = (power_mpp, power_mpp)
    if override is not None:
        chosen: tuple[str, tuple[float, float]] | None = ("override", override)
    elif measured:
        chosen = measured[0]
    elif estimate is not None:
        chosen = ("objective-power", estimate)
        logger.warning(
            "%s: no µm/px in the file; estimating %.4g µm/px from objective power %gx. "
            "Pass mpp= to be exact.", path, estimate[0], objective_power,
        )
    else:
        chosen = None
    if chosen is None:
        raise MissingResolutionError(
            path,
            "no µm/px resolution found (no vendor property, no vendor ImageDescription, no TIFF "
            "resolution tags, no objective power)",
        )
    _warn_disagreements(path, chosen, measured, estimate, objective_power)
    return chosen[1], chosen[0]


def _warn_disagreements(
    path: Path,
    chosen: tuple[str, tuple[float, float]],
    measured: list[tuple[str, tuple[float, float]]],
    estimate: tuple[float, float] | None,
    objective_power: float | None,
) -> None:
    """Log one warning naming every source that disagrees with the chosen one."""
    source, value = chosen
    others = [f"{s} says {v[0]:.4g} x {v[1]:.4g}" for s, v in measured
              if s != source and _disagree(value, v, _AGREE_RTOL)]
    if estimate is not None and source != "objective-power" and _disagree(value, estimate, _OBJECTIVE_RTOL):
        others.append(f"objective power {objective_power:g}x suggests ~{estimate[0]:.3g}")
    if not others:
        return
    message = (f"{path}: µm/px sources disagree: using {source} {value[0]:.4g} x {value[1]:.4g}, but "
               f"{'; '.join(others)}. Check the scanner's value and pass mpp= if the file is wrong.")
    # once per process: pipelines reopen the same slide in reader threads with the same values
    if message in _WARNED:
        logger.debug("%s", message)
        return
    _WARNED.add(message)
    logger.warning("%s", message)


_WARNED: set[str] = set()
