"""Thin adapters that give OpenSlide, tiffslide and wsidicom one small interface.

Every adapter exposes level geometry, string properties, vendor/objective/µm/px
metadata as the backend reports it, lazy associated images and ``read_region``
returning ``H x W x 3`` uint8 RGB composited on white. The public
:class:`wsi_cmaf.slide.SlideReader` sits on top and owns error mapping and the
µm/px resolution chain; these classes only translate.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_cmaf.slide._mpp import positive_float
from wsi_cmaf.slide._pixels import composite_straight_rgba, level_origin
from wsi_cmaf.slide.faults import DEFAULT_TILE, decode_segments_tolerant, read_window_tolerant

logger = logging.getLogger(__name__)

#: threads tifffile may use to decode the tiles of a whole-level read (thumbnails)
_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: pixels (as 4-byte RGBA) of one backend read when a whole level is streamed
_READ_PIECE_BYTES = 128 * 1024 * 1024
#: compressed bytes tifffile reads from the file per pass of a whole-level read
_SEGMENT_BYTES = 32 * 1024 * 1024
#: Largest tile the whole-level path decodes itself (tile sizes come from the file's header)
_MAX_TILE_PIXELS = 16 * 1024 * 1024
#: TIFF compressions whose decoders return RGB for YCbCr photometric (JPEG, Aperio and
#: generic JPEG 2000)
_YCBCR_DECODED = (7, 33003, 33005, 34712)

#: Exceptions a backend library may raise for a file it cannot decode. Reader code
#: catches these (never bare ``Exception``) and re-raises named wsi-cmaf errors.
#: struct.error: tifffile unpacking a cut or garbled IFD; ArithmeticError: sizes that overflow;
#: MemoryError: a header claiming a gigantic image (reported as an unreadable file).
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    LookupError,
    TypeError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    ArithmeticError,
    AssertionError,
    EOFError,
    struct.error,
    MemoryError,
)


def library_errors(name: str) -> tuple[type[BaseException], ...]:
    """Exception types backend ``name`` raises for undecodable input (importing it lazily)."""
    extra: list[type[BaseException]] = []
    if name == "openslide":
        from openslide import OpenSlideError

        extra.append(OpenSlideError)
    elif name in ("wsidicom", "pydicom"):
        from pydicom import errors as pde

        modules: list[Any] = [pde]  # InvalidDicomError, BytesLengthException (a garbled length), ...
        if name == "wsidicom":
            from wsidicom import errors as wse

            modules.append(wse)  # wsidicom parses with pydicom: both kinds surface
        extra += [
            obj for module in modules for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Exception)
        ]
    return BACKEND_ERRORS + tuple(extra)


class Backend(ABC):
    """What :class:`SlideReader` needs from a slide library."""

    name: str = ""
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    vendor: str | None = None
    objective_power: float | None = None
    #: µm/px the library reports from scanner metadata (not from plain TIFF tags).
    vendor_mpp: tuple[float, float] | None = None
    associated_names: tuple[str, ...] = ()
    #: Fixed cost of one read_region call expressed in pixels' worth of decoding, so block
    #: reads can trade fewer calls against fewer decoded pixels (see reads.plan_reads).
    #: Measured on the 40,000 px benchmark slide at its 4 µm/px level (2 cores): OpenSlide
    #: ~0.05 ms per call and ~36 ns per pixel; tiffslide ~2 ms per call and ~10 ns per pixel.
    call_overhead_px: int = 50_000

    @abstractmethod
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3); location in level-0 pixels."""

    def level_rows(
        self, level: int, rows: int, failures: list[tuple[int, int, int, int, str]] | None = None
    ) -> Iterator[np.ndarray]:
        """All of ``level``, top to bottom, as strips of ``rows`` rows (the last may be shorter).

        ``failures``: when a list, a read that fails to decode is retried tile by tile; tiles
        that still fail come back white and ``(x, y, w, h, reason)`` (level px) is appended.
        When None, the first decoding error propagates.
        """
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # Few large reads, handed out in small strips: a read that cuts through the slide's
        # tiles decodes those tiles twice (OpenSlide's JPEG 2000 levels: ~2x slower at 8 MiB).
        piece = max(rows, _READ_PIECE_BYTES // (4 * lw) // rows * rows)

        def read(x: int, y: int, w: int, h: int) -> np.ndarray:
            # exact multiples of the downsample: OpenSlide resamples off-grid level locations
            return self.read_region((round(x * ds), round(y * ds)), level, (w, h))

        for y in range(0, lh, piece):
            box = (0, y, lw, min(piece, lh - y))
            if failures is None:
                block = read(*box)
            else:
                block = read_window_tolerant(
                    read, box, self.tile_size(level), library_errors(self.name), self.recover,
                    lambda cell, why: failures.append((*cell, why)))
            for r in range(0, len(block), rows):
                yield block[r:r + rows]

    def tile_size(self, level: int) -> tuple[int, int]:
        """(w, h) of the level's storage tiles as the library reports them (a guess otherwise)."""
        prefix = {"openslide": "openslide", "tiffslide": "tiffslide"}.get(self.name)
        if prefix is not None:
            w = positive_float(self.properties.get(f"{prefix}.level[{level}].tile-width"))
            h = positive_float(self.properties.get(f"{prefix}.level[{level}].tile-height"))
            if w and h:
                return int(w), int(h)
        return DEFAULT_TILE, DEFAULT_TILE

    def recover(self) -> None:  # noqa: B027  (an optional hook: the no-op is the right default)
        """Make the handle usable again after a failed read (most libraries need nothing)."""

    @abstractmethod
    def read_associated(self, name: str) -> np.ndarray:
        """One associated image as RGB uint8."""

    @abstractmethod
    def close(self) -> None:
        """Release file handles."""


# --------------------------------------------------------------------------- OpenSlide
class OpenSlideBackend(Backend):
    """OpenSlide (C library bundled by openslide-bin)."""

    name = "openslide"
    call_overhead_px = 2_000

    def __init__(self, path: Path) -> None:
        import openslide
        from openslide import lowlevel

        self._lowlevel = lowlevel
        self._path = str(path)
        self._error_type = openslide.OpenSlideError
        self._stale: list[Any] = []  # handles replaced by recover(), closed with the backend
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.properties = {str(k): str(v) for k, v in props.items()}
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.vendor = vendor or None
        self.objective_power = positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        mx = positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        my = positive_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
        # For generic TIFF OpenSlide derives mpp from the resolution tags; the reader
        # reads those tags itself so the µm/px *source* is reported truthfully.
        if mx and my and vendor not in (None, "", "generic-tiff"):
            self.vendor_mpp = (mx, my)
        self.associated_names = tuple(self._slide.associated_images.keys())
        # The private ctypes entry point lets us decode straight into a numpy buffer and
        # skip openslide-python's per-call un-premultiply + PIL round trip (the hot path
        # of block reads). Fall back to the public API if it ever disappears.
        self._raw_read = getattr(lowlevel, "_read_region", None)
        if sys.byteorder != "little":
            self._raw_read = None

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        try:
            return self._read_region(location, level, size)
        except self._error_type:
            # An OpenSlide handle refuses every later call once one read failed (the error is
            # sticky): reopen it, so one bad tile does not fail the rest of the slide.
            self.recover()
            raise

    def recover(self) -> None:
        """Reopen the slide when OpenSlide has put the current handle in its error state."""
        import openslide

        if self._lowlevel.get_error(self._slide._osr) is None:
            return
        # The old handle is kept, not closed: another thread may still be inside a call on it.
        self._stale.append(self._slide)
        self._slide = openslide.OpenSlide(self._path)
        logger.debug("reopened %s after a failed OpenSlide read", self._path)

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        w, h = int(size[0]), int(size[1])
        x, y = int(location[0]), int(location[1])
        if self._raw_read is None:
            return self.read_region_public(location, level, size)
        buf = np.empty((h, w), dtype=np.uint32)
        if w and h:
            self._raw_read(
                self._slide._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                x, y, level, w, h,
            )
        if not buf.size:
            return np.zeros((h, w, 3), np.uint8)
        # Premultiplied ARGB in native (little-endian) words -> bytes B, G, R, A. Alpha is the
        # high byte, so a contiguous uint32 min tells "fully opaque" far faster than a strided
        # look at the alpha bytes, and PIL's C unpacker drops alpha faster than numpy slicing.
        if buf.min() >= 0xFF000000:
            return np.asarray(Image.frombuffer("RGBA", (w, h), buf, "raw", "BGRA", 0, 1).convert("RGB"))
        bgra = buf.view(np.uint8).reshape(h, w, 4)
        rgb = bgra[..., 2::-1].copy()
        # Premultiplied colour over white: c + (255 - a); c <= a so no overflow.
        rgb += (255 - bgra[..., 3])[..., None]
        return rgb

    def read_region_public(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Reference path through openslide-python's public API (used when ctypes is absent)."""
        img = self._slide.read_region((int(location[0]), int(location[1])), level, (int(size[0]), int(size[1])))
        return composite_straight_rgba(np.asarray(img))

    def read_associated(self, name: str) -> np.ndarray:
        return composite_straight_rgba(np.asarray(self._slide.associated_images[name].convert("RGBA")))

    def close(self) -> None:
        for handle in [*self._stale, self._slide]:
            handle.close()
        self._stale.clear()


# --------------------------------------------------------------------------- tiffslide
class TiffSlideBackend(Backend):
    """tiffslide (pure Python over tifffile + zarr)."""

    name = "tiffslide"
    call_overhead_px = 200_000

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._path = str(path)
        self._tiff: Any = None  # own tifffile handle for whole-level reads, opened on first use
        self._slide = tiffslide.TiffSlide(str(path))
        props = self._slide.properties
        self.properties = {str(k): str(v) for k, v in props.items() if v is not None}
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.vendor = props.get("tiffslide.vendor") or None
        self.objective_power = positive_float(props.get("tiffslide.objective-power"))
        mx = positive_float(props.get("tiffslide.mpp-x"))
        my = positive_float(props.get("tiffslide.mpp-y"))
        if mx and my and self.vendor is not None:
            self.vendor_mpp = (mx, my)
        self.associated_names = tuple(self._slide.associated_images.keys())

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        w, h = int(size[0]), int(size[1])
        loc = (int(location[0]), int(location[1]))
        arr = self._slide.read_region(loc, level, (w, h), as_array=True, padding=True)
        arr = composite_straight_rgba(arr) if arr.shape[-1] == 4 else np.ascontiguousarray(arr)
        # tiffslide pads out-of-bounds areas with black; OpenSlide gives transparent
        # (-> white). Whiten them so both backends agree.
        x0, y0 = level_origin(loc, self.level_downsamples[level])
        lw, lh = self.level_dimensions[level]
        if x0 < 0 or y0 < 0 or x0 + w > lw or y0 + h > lh:
            arr[: max(0, -y0)] = 255
            arr[max(0, lh - y0) :] = 255
            arr[:, : max(0, -x0)] = 255
            arr[:, max(0, lw - x0) :] = 255
        return arr

    def level_rows(
        self, level: int, rows: int, failures: list[tuple[int, int, int, int, str]] | None = None
    ) -> Iterator[np.ndarray]:
        """Whole-level strips decoded by tifffile itself, several tiles at a time.

        tiffslide goes through zarr, whose event loop decodes one tile after another (tifffile's
        default is one worker on a 2-core machine): a whole 6,250 x 5,000 px JPEG level takes
        ~0.35 s there and ~0.12 s with ``TiffPage.segments`` on two threads, same pixels. Levels
        tifffile would not hand back as plain RGB (other layouts, sample counts, dtypes) keep
        the tiffslide path.
        """
        page = self._level_page(level)
        if page is None:
            yield from super().level_rows(level, rows, failures)
            return
        lw, lh = self.level_dimensions[level]
        tile_w, tile_h = page.tilewidth, page.tilelength

        def failed(index: int, reason: str) -> None:
            row, col = divmod(index, -(-lw // tile_w))
            x, y = col * tile_w, row * tile_h
            failures.append((x, y, min(tile_w, lw - x), min(tile_h, lh - y), reason))  # type: ignore[union-attr]

        done = 0
        for strip in self._segment_strips(page, level, rows, None if failures is None else failed):
            done += len(strip)
            yield strip
        if done < lh:
            # a corrupt file can list fewer tiles than its size needs: the rest is missing
            why = f"tile data missing: the file lists tiles for {done} of {lh} rows"
            if failures is None:
                raise ValueError(f"level {level}: {why}")
            failures.append((0, done, lw, lh - done, why))
            for y in range(done, lh, rows):
                yield np.full((min(rows, lh - y), lw, 3), 255, np.uint8)

    def _segment_strips(self, page: Any, level: int, rows: int, failed: Any) -> Iterator[np.ndarray]:
        """Strips of ``rows`` rows assembled from tifffile's decoded tiles (see level_rows)."""
        lw, lh = self.level_dimensions[level]
        pending: list[np.ndarray] = []  # finished tile rows not yet handed out
        n_pending = 0
        tile_row: np.ndarray | None = None
        segments = decode_segments_tolerant(page, library_errors(self.name), failed, _DECODE_THREADS, _SEGMENT_BYTES)
        for data, index, shape in segments:
            y, x, tw = index[2], index[3], shape[2]
            if tile_row is None:
                # absent (sparse) tiles stay white, as OpenSlide renders them
                tile_row = np.full((min(page.tilelength, lh - y), lw, 3), 255, np.uint8)
            if data is not None:
                w = min(tw, lw - x)
                tile_row[:, x:x + w] = data[0, : tile_row.shape[0], :w, :3]
            if x + tw < lw:
                continue
            pending.append(tile_row)
            n_pending += len(tile_row)
            last = y + len(tile_row) >= lh
            tile_row = None
            while n_pending >= rows or (last and n_pending):
                block = pending[0] if len(pending) == 1 else np.concatenate(pending)
                yield block[:rows]
                rest = block[rows:]
                pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)

    def _level_page(self, level: int) -> Any:
        """tifffile's page of ``level`` when it is a tiled, 8-bit, 3-sample RGB(-decoded) image."""
        if self._tiff is None:
            import tifffile

            # An own handle: tiffslide's is shared with its zarr store and this one may be
            # used from another thread than the tiffslide reads.
            self._tiff = tifffile.TiffFile(self._path)
        levels = self._tiff.series[0].levels if self._tiff.series else []
        if len(levels) != len(self.level_dimensions):
            return None
        page = levels[level].keyframe
        lw, lh = self.level_dimensions[level]
        photometric_ok = page.photometric == 2 or (page.photometric == 6 and page.compression in _YCBCR_DECODED)
        if (page.is_tiled and page.dtype == np.uint8 and page.samplesperpixel == 3 and page.planarconfig == 1
                and page.tilewidth * page.tilelength <= _MAX_TILE_PIXELS and photometric_ok
                and page.shape[:2] == (lh, lw) and len(levels[level].pages) == 1):
            return page
        return None

    def read_associated(self, name: str) -> np.ndarray:
        img = self._slide.associated_images[name]
        return composite_straight_rgba(np.asarray(img.convert("RGBA")))

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
        self._slide.close()
