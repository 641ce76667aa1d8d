"""Open whole-slide images through OpenSlide, tiffslide or a DICOM reader behind one API.

``open_slide(path)`` validates the path, picks a backend (``auto``: OpenSlide, then
tiffslide, then wsidicom, then a minimal pydicom reader for non-conformant single-file
DICOM), resolves level-0 µm/px through the chain documented in
:mod:`wsi_cmaf.slide._mpp`, and returns a :class:`SlideReader` whose ``read_region``
always yields ``H x W x 3`` uint8 RGB composited on white.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_cmaf.errors import (
    BackendUnavailableError,
    ConfigError,
    MissingResolutionError,
    NotASlideFileError,
    RequestTooLargeError,
    SlideNotFoundError,
    UnreadableSlideError,
    UnsupportedSlideError,
)
from wsi_cmaf.slide import _mpp
from wsi_cmaf.slide._backends import Backend, library_errors
from wsi_cmaf.slide.faults import Thumbnail, thumbnail_failures

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("openslide", "tiffslide", "wsidicom", "pydicom")
_MODULE_OF = {"openslide": "openslide", "tiffslide": "tiffslide", "wsidicom": "wsidicom",
              "pydicom": "pydicom"}
_MIB = 1 << 20


def file_fingerprint(path: str | Path) -> str:
    """Size + SHA-256 of the first and last MiB of a slide file (or of every .dcm in a folder).

    Cheap enough for thousands of slides, mtime-free (a copied archive keeps its fingerprints).
    Raises SlideNotFoundError when the path does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file or directory")
    files = sorted(p.glob("*.dcm")) if p.is_dir() else [p]
    digest = hashlib.sha256()
    total = 0
    for file in files:
        size = file.stat().st_size
        total += size
        with open(file, "rb") as fh:
            digest.update(fh.read(_MIB))
            if size > _MIB:
                fh.seek(max(_MIB, size - _MIB))
                digest.update(fh.read(_MIB))
        digest.update(str(size).encode())
    return f"size={total};sha256={digest.hexdigest()}"
#: Bytes of one strip reduced at a time while building a thumbnail: small strips stay in
#: cache (PIL's unpack and box reduce run ~2x faster on 8 MiB than on 100 MiB strips).
_THUMB_STRIP_BYTES = 8 * _MIB
#: Most pixels one read_region call or one thumbnail (and its intermediate) may hold: 256 Mpx
#: (768 MiB RGB). Sizes come from user numbers and file headers; past this they are mistakes.
MAX_PIXELS = 1 << 28


def _make_backend(name: str, path: Path) -> Backend:
    cls: Callable[[Path], Backend]
    if name == "openslide":
        from wsi_cmaf.slide._backends import OpenSlideBackend as cls
    elif name == "tiffslide":
        from wsi_cmaf.slide._backends import TiffSlideBackend as cls
    elif name == "wsidicom":
        from wsi_cmaf.slide._dicom import WsiDicomBackend as cls
    else:
        from wsi_cmaf.slide._dicom import PydicomBackend as cls
    return cls(path)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise SlideNotFoundError(path, "no such file")
    if path.is_dir():
        if not any(path.glob("*.dcm")):
            raise NotASlideFileError(
                path, "is a directory, not a slide file (only a folder of DICOM .dcm files "
                "can be opened as one slide)",
            )
        return
    if not path.is_file():
        raise NotASlideFileError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise NotASlideFileError(path, "is an empty (zero-byte) file")


def _check_pixel_format(path: Path, facts: _mpp.TiffFacts | None) -> None:
    if facts is None:
        return
    if facts.dtype != "uint8" or facts.samples not in (3, 4):
        raise UnsupportedSlideError(
            path,
            f"unsupported pixel format: {facts.samples} sample(s) of {facts.dtype} "
            f"({facts.photometric}); wsi-cmaf analyses 8-bit RGB brightfield slides only",
        )


def open_slide(
    path: str | Path,
    backend: str = "auto",
    mpp: float | tuple[float, float] | str | None = None,
) -> SlideReader:
    """Open a whole-slide image.

    Args:
        path: slide file (SVS, pyramidal TIFF, DICOM ...) or a folder of DICOM files.
        backend: ``"auto"`` or one of :data:`BACKENDS`.
        mpp: level-0 µm/px override (one value, its text, or ``(x, y)``); always wins over metadata.
            ``mpp="estimate"`` (measured from the nuclei) is :func:`wsi_cmaf.slide.open_slide`'s.

    Raises:
        SlideNotFoundError, NotASlideFileError, UnsupportedSlideError, UnreadableSlideError,
        BackendUnavailableError, ConfigError (bad ``mpp``/``backend``).
    """
    path = Path(path)
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}; choose auto or one of {BACKENDS}")
    if isinstance(mpp, str) and mpp.strip().lower() == "estimate":
        # the estimator reads tissue through this reader: it sits in the layer above
        raise ConfigError("mpp='estimate' measures the µm/px from the nuclei: open the slide with "
                          "wsi_cmaf.slide.open_slide (wsi_cmaf.slide.opener), not wsi_cmaf.slide.reader.open_slide")
    override = _mpp.normalise_override(mpp)
    _check_path(path)
    facts = _mpp.tiff_facts(path) if path.is_file() else None
    _check_pixel_format(path, facts)

    if backend != "auto":
        if importlib.util.find_spec(_MODULE_OF[backend]) is None:
            raise BackendUnavailableError(f"slide backend {backend!r} is not installed")
        try:
            impl = _make_backend(backend, path)
        except library_errors(backend) as exc:
            raise UnreadableSlideError(path, f"backend {backend} cannot open it: {exc}") from exc
        return SlideReader(path, impl, override, facts)

    failures: list[str] = []
    candidates = ("wsidicom",) if path.is_dir() else BACKENDS
    for name in candidates:
        if importlib.util.find_spec(_MODULE_OF[name]) is None:
            failures.append(f"{name}: not installed")
            continue
        try:
            impl = _make_backend(name, path)
        except library_errors(name) as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            logger.debug("%s cannot open %s: %s", name, path, exc)
            continue
        return SlideReader(path, impl, override, facts)
    raise UnreadableSlideError(path, "no backend could open it (" + "; ".join(failures) + ")")


class _AssociatedImages(Mapping[str, np.ndarray]):
    """Read-only mapping name -> RGB array, decoded on first access and cached."""

    def __init__(self, reader: SlideReader) -> None:
        self._reader = reader
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._reader._impl.associated_names:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self._reader._guard(
                lambda: self._reader._impl.read_associated(name), f"associated image {name!r}"
            )
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader._impl.associated_names)

    def __len__(self) -> int:
        return len(self._reader._impl.associated_names)


class SlideReader:
    """One open slide. Create with :func:`open_slide`; use as a context manager."""

    def __init__(
        self,
        path: Path,
        impl: Backend,
        override: tuple[float, float] | None,
        facts: _mpp.TiffFacts | None,
    ) -> None:
        self.path = path
        self._impl = impl
        self.backend: str = impl.name
        self.call_overhead_px: int = int(impl.call_overhead_px)
        self.level_count: int = len(impl.level_dimensions)
        self.level_dimensions: tuple[tuple[int, int], ...] = impl.level_dimensions
        self.level_downsamples: tuple[float, ...] = impl.level_downsamples
        self.vendor: str | None = impl.vendor
        # the description's AppMag when the backend did not read it (e.g. OpenSlide generic-tiff)
        self.objective_power: float | None = impl.objective_power or (
            facts.description_objective if facts else None)
        self.properties: dict[str, str] = dict(impl.properties)
        self.associated_images: Mapping[str, np.ndarray] = _AssociatedImages(self)
        if self.level_count == 0 or min(min(d) for d in self.level_dimensions) <= 0:
            impl.close()
            raise UnreadableSlideError(path, f"backend {self.backend} reports no usable image level")
        self._mpp: tuple[float, float] | None = None
        self._mpp_source: str | None = None
        self._mpp_error: MissingResolutionError | None = None
        try:
            self._mpp, self._mpp_source = _mpp.resolve_mpp(
                path, override, impl.vendor_mpp,
                facts.resolution_mpp if facts else None, self.objective_power,
                description_mpp=facts.description_mpp if facts else None,
            )
        except MissingResolutionError as exc:
            # Deferred: `info` and thumbnails-by-level still work; anything needing µm/px raises.
            self._mpp_error = exc
        self._errors = library_errors(self.backend)
        self._closed = False
        #: the µm/px estimate in use (see :meth:`use_mpp_estimate`; else None)
        self.mpp_estimate: Any = None
        logger.debug("opened %s with %s (%d levels)", path, self.backend, self.level_count)

    # -- resolution --------------------------------------------------------------------
    def use_mpp_estimate(self, estimate: Any, source: str) -> None:
        """Take ``estimate.mpp`` (an isotropic level-0 µm/px measured from the image, e.g. a
        :class:`wsi_cmaf.qc.mpp_estimate.MppEstimate`) as the slide's µm/px, with ``mpp_source``
        ``source``; what the metadata said is kept in ``metadata_mpp``."""
        if self._mpp is not None:
            logger.info("%s: using the estimated %.3g µm/px instead of the %s value %.4g", self.path,
                        estimate.mpp, self._mpp_source, self._mpp[0])
        self.mpp_estimate = estimate
        #: what the file's metadata said before the estimate replaced it (None: nothing, or an override)
        self.metadata_mpp = self._mpp if self._mpp_source not in (None, "override") else None
        self._mpp, self._mpp_source, self._mpp_error = (estimate.mpp, estimate.mpp), source, None

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 (x, y) µm/px; raises MissingResolutionError when unresolvable."""
        if self._mpp is None:
            assert self._mpp_error is not None
            raise self._mpp_error
        return self._mpp

    @property
    def has_mpp(self) -> bool:
        """Whether µm/px is known (from metadata or the override)."""
        return self._mpp is not None

    @property
    def mpp_source(self) -> str | None:
        """'override' | 'vendor' | 'description' | 'tiff-resolution' | 'objective-power' |
        'estimated from nuclei'; None when unknown.

        'vendor': the opening backend's scanner property; 'description': the level-0 TIFF
        ImageDescription parsed by wsi-cmaf (Aperio ``MPP``, OME, Philips) whatever backend opened it.
        """
        return self._mpp_source

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) µm/px of ``level`` (from the level's size relative to level 0)."""
        self._check_level(level)
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        mx, my = self.mpp
        return mx * w0 / w, my * h0 / h

    def level_for_mpp(self, target_mpp: float, tolerance: float = 0.05) -> int:
        """Coarsest level whose µm/px is <= ``target_mpp * (1 + tolerance)`` (level 0 if none)."""
        if not (target_mpp > 0 and math.isfinite(target_mpp)):
            raise ValueError(f"target_mpp must be a positive number, got {target_mpp!r}")
        limit = target_mpp * (1.0 + tolerance)
        best = 0
        for level in range(self.level_count):
            if max(self.level_mpp(level)) <= limit and self.level_downsamples[level] >= self.level_downsamples[best]:
                best = level
        if best == 0 and min(self.mpp) > limit:
            logger.warning("%s: target %.3g µm/px is finer than level 0 (%.3g); upsampling",
                           self.path, target_mpp, min(self.mpp))
        return best

    # -- pixels --------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read ``size`` (w, h) level pixels at level-0 ``location`` -> (h, w, 3) uint8 RGB.

        Areas outside the slide come back white. Decoding failures (corrupt or truncated
        data) raise UnreadableSlideError.

        At ``level > 0`` pass ``location = round(level_px * level_downsamples[level])``:
        OpenSlide resamples (blends neighbouring pixels) when the location is not on the
        level's pixel grid, while tiffslide floors it, so off-grid locations make the two
        backends disagree by up to a pixel.
        """
        self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size!r}")
        if w * h > MAX_PIXELS:
            raise RequestTooLargeError(
                f"{self.path}: region {w}x{h} px ({w * h / 1e6:.0f} Mpx) is larger than the "
                f"{MAX_PIXELS / 1e6:.0f} Mpx one read may hold; read it in pieces")
        return self._guard(
            lambda: self._impl.read_region((int(location[0]), int(location[1])), level, (w, h)),
            f"region {w}x{h} at {tuple(location)} level {level}",
        )

    def thumbnail(self, mpp: float) -> Thumbnail:
        """The whole slide resampled to ``mpp`` µm/px (antialiased), as RGB uint8.

        Reads the coarsest level at least as fine as the target in strips (bounded
        memory), box-reduces each strip by the integer part of the scale factor, then
        resizes with Lanczos to the exact target grid
        ``floor(level0_size * level0_mpp / mpp + 0.5)``.

        Undecodable tiles of that level are painted as background (white), logged in one
        warning and listed in the result's ``failed_tiles`` (level-0 locations, see
        :class:`~wsi_cmaf.slide.faults.TileFailure`); the result is a numpy array for every
        other use. Raises NoDecodableTissueError when no tile of the level decodes and
        RequestTooLargeError when ``mpp`` would make the thumbnail (or the level strips it is
        made from) larger than :data:`MAX_PIXELS`.
        """
        mpp = float(mpp)
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"thumbnail mpp must be a positive number of µm/px, got {mpp!r}")
        mx, my = self.mpp
        w0, h0 = self.level_dimensions[0]
        out_size = (max(1, int(w0 * mx / mpp + 0.5)), max(1, int(h0 * my / mpp + 0.5)))
        level = self.level_for_mpp(mpp)
        lw, lh = self.level_dimensions[level]
        lmx, lmy = self.level_mpp(level)
        factor = max(1, int(min(mpp / lmx, mpp / lmy) + 1e-6))
        self._check_thumbnail_size(mpp, out_size, (lw, lh), factor)
        rows = max(factor, (_THUMB_STRIP_BYTES // (lw * 4)) // factor * factor)
        raw: list[tuple[int, int, int, int, str]] = []
        # level_rows is a generator: it reads (and may fail) only as the loop pulls strips
        strips = self._impl.level_rows(level, rows, raw)
        parts = []
        while True:
            strip = self._guard(lambda: next(strips, None), f"level {level} for a thumbnail")
            if strip is None:
                break
            parts.append(np.asarray(Image.fromarray(strip).reduce(factor)) if factor > 1 else strip)
        failures = thumbnail_failures(self.path, self.backend, level, self.level_downsamples[level],
                                      self.level_dimensions[level], raw)
        reduced = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if (reduced.shape[1], reduced.shape[0]) == out_size:
            return Thumbnail(np.ascontiguousarray(reduced), failures, level)
        resized = Image.fromarray(reduced).resize(out_size, Image.Resampling.LANCZOS)
        return Thumbnail(np.asarray(resized), failures, level)

    def _check_thumbnail_size(self, mpp: float, out_size: tuple[int, int], level_size: tuple[int, int],
                              factor: int) -> None:
        """Refuse thumbnails whose output, reduced level or strips exceed MAX_PIXELS."""
        lw, lh = level_size
        sizes = {"thumbnail": out_size[0] * out_size[1], "reduced level": -(-lw // factor) * -(-lh // factor),
                 "level strip": lw * factor}
        what, n = max(sizes.items(), key=lambda kv: kv[1])
        if n > MAX_PIXELS:
            raise RequestTooLargeError(
                f"{self.path}: a thumbnail at {mpp:g} µm/px needs a {what} of {n / 1e6:.0f} Mpx "
                f"(level {self.level_dimensions.index(level_size)}: {lw}x{lh} px), over the "
                f"{MAX_PIXELS / 1e6:.0f} Mpx limit; ask for a coarser µm/px")

    # -- identity ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Cheap content fingerprint: size + SHA-256 of the first and last MiB (mtime-free)."""
        return file_fingerprint(self.path)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the backend's file handles (idempotent)."""
        if not self._closed:
            self._closed = True
            self._impl.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self._mpp[0]:.4g}x{self._mpp[1]:.4g} ({self._mpp_source})" if self._mpp else "unknown"
        return (f"SlideReader({str(self.path)!r}, backend={self.backend!r}, "
                f"levels={self.level_dimensions}, mpp={mpp})")

    # -- helpers -----------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range for {self.path} ({self.level_count} levels)")

    def _guard(self, fn: Any, what: str) -> Any:
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")
        try:
            return fn()
        except self._errors as exc:
            raise UnreadableSlideError(
                self.path, f"reading {what} with {self.backend} failed: {type(exc).__name__}: {exc}"
            ) from exc
