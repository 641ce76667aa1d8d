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
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

#: threads tifffile may use to decode the tiles of a whole-level read (thumbnails)
_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: pixels (as 4-byte RGBA) of one backend read when a whole level is streamed
_READ_PIECE_BYTES = 128 * 1024 * 1024
#: compressed bytes tifffile reads from the file per pass of a whole-level read
_SEGMENT_BYTES = 32 * 1024 * 1024
#: TIFF compressions whose decoders return RGB for YCbCr photometric (JPEG, Aperio and
#: generic JPEG 2000)
_YCBCR_DECODED = (7, 33003, 33005, 34712)

#: Exceptions a backend library may raise for a file it cannot decode. Reader code
#: catches these (never bare ``Exception``) and re-raises named wsi-cmaf errors.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    ZeroDivisionError,
    AssertionError,
    EOFError,
)


def library_errors(name: str) -> tuple[type[BaseException], ...]:
    """Exception types backend ``name`` raises for undecodable input (importing it lazily)."""
    extra: list[type[BaseException]] = []
    if name == "openslide":
        from openslide import OpenSlideError

        extra.append(OpenSlideError)
    elif name == "wsidicom":
        from wsidicom import errors as wse

        extra += [
            obj for obj in vars(wse).values()
            if isinstance(obj, type) and issubclass(obj, Exception)
        ]
    elif name == "pydicom":
        from pydicom.errors import InvalidDicomError

        extra.append(InvalidDicomError)
    return BACKEND_ERRORS + tuple(extra)


def _to_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def level_origin(location: tuple[int, int], downsample: float) -> tuple[int, int]:
    """Level-0 location -> top-left pixel in a level (same rule as OpenSlide/tiffslide)."""
    return int(location[0] / downsample), int(location[1] / downsample)


def composite_straight_rgba(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA on white -> RGB uint8."""
    alpha = rgba[..., 3]
    rgb = np.ascontiguousarray(rgba[..., :3])
    if alpha.min() == 255:
        return rgb
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def paste_clipped(
    read: Any, origin: tuple[int, int], size: tuple[int, int], level_dims: tuple[int, int]
) -> np.ndarray:
    """Read the in-bounds part of a level window with ``read(x, y, w, h)`` and pad with white.

    ``origin`` and ``size`` are in level pixels; ``read`` returns RGB uint8 for an
    in-bounds rectangle. White padding matches OpenSlide (transparent -> white).
    """
    w, h = size
    x0, y0 = origin
    lw, lh = level_dims
    if x0 >= 0 and y0 >= 0 and x0 + w <= lw and y0 + h <= lh:
        return read(x0, y0, w, h)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, lw), min(y0 + h, lh)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = read(cx0, cy0, cx1 - cx0, cy1 - cy0)
    return out


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
    #: reads can trade fewer calls against fewer decoded pixels (see grid.plan_reads).
    #: Measured on the 40,000 px benchmark slide at its 4 µm/px level (2 cores): OpenSlide
    #: ~0.05 ms per call and ~36 ns per pixel; tiffslide ~2 ms per call and ~10 ns per pixel.
    call_overhead_px: int = 50_000

    @abstractmethod
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3); location in level-0 pixels."""

    def level_rows(self, level: int, rows: int) -> Iterator[np.ndarray]:
        """All of ``level``, top to bottom, as strips of ``rows`` rows (the last may be shorter)."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # Few large reads, handed out in small strips: a read that cuts through the slide's
        # tiles decodes those tiles twice (OpenSlide's JPEG 2000 levels: ~2x slower at 8 MiB).
        piece = max(rows, _READ_PIECE_BYTES // (4 * lw) // rows * rows)
        for y in range(0, lh, piece):
            # exact multiples of the downsample: OpenSlide resamples off-grid level locations
            block = self.read_region((0, round(y * ds)), level, (lw, min(piece, lh - y)))
            for r in range(0, len(block), rows):
                yield block[r:r + rows]

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
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.properties = {str(k): str(v) for k, v in props.items()}
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.vendor = vendor or None
        self.objective_power = _to_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        mx = _to_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        my = _to_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
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
        img = self._slide.read_region(tuple(map(int, location)), level, tuple(map(int, size)))
        return composite_straight_rgba(np.asarray(img))

    def read_associated(self, name: str) -> np.ndarray:
        return composite_straight_rgba(np.asarray(self._slide.associated_images[name].convert("RGBA")))

    def close(self) -> None:
        self._slide.close()


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
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.vendor = props.get("tiffslide.vendor") or None
        self.objective_power = _to_float(props.get("tiffslide.objective-power"))
        mx = _to_float(props.get("tiffslide.mpp-x"))
        my = _to_float(props.get("tiffslide.mpp-y"))
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

    def level_rows(self, level: int, rows: int) -> Iterator[np.ndarray]:
        """Whole-level strips decoded by tifffile itself, several tiles at a time.

        tiffslide goes through zarr, whose event loop decodes one tile after another (tifffile's
        default is one worker on a 2-core machine): a whole 6,250 x 5,000 px JPEG level takes
        ~0.35 s there and ~0.12 s with ``TiffPage.segments`` on two threads, same pixels. Levels
        tifffile would not hand back as plain RGB (other layouts, sample counts, dtypes) keep
        the tiffslide path.
        """
        page = self._level_page(level)
        if page is None:
            yield from super().level_rows(level, rows)
            return
        lw, lh = self.level_dimensions[level]
        pending: list[np.ndarray] = []  # finished tile rows not yet handed out
        n_pending = 0
        tile_row: np.ndarray | None = None
        for data, index, shape in page.segments(maxworkers=_DECODE_THREADS, buffersize=_SEGMENT_BYTES):
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
                and photometric_ok and page.shape[:2] == (lh, lw) and len(levels[level].pages) == 1):
            return page
        return None

    def read_associated(self, name: str) -> np.ndarray:
        img = self._slide.associated_images[name]
        return composite_straight_rgba(np.asarray(img.convert("RGBA")))

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
        self._slide.close()


# --------------------------------------------------------------------------- wsidicom
class WsiDicomBackend(Backend):
    """wsidicom for standard-conformant DICOM WSI (single file or a series folder)."""

    name = "wsidicom"

    def __init__(self, path: Path) -> None:
        from wsidicom import WsiDicom

        with warnings.catch_warnings():
            # pydicom warns on over-long UI/LO values, common in converted files; harmless.
            warnings.simplefilter("ignore", UserWarning)
            self._slide = WsiDicom.open(path if path.is_dir() else [path])
        levels = list(self._slide.levels)
        base = levels[0].size
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self.level_downsamples = tuple(
            float((base.width / lv.size.width + base.height / lv.size.height) / 2) for lv in levels
        )
        self._levels = [lv.level for lv in levels]
        mpp = self._slide.mpp  # wsidicom reports µm per pixel despite the SizeMm type name
        if mpp is not None:
            mx, my = _to_float(mpp.width), _to_float(mpp.height)
            if mx and my:
                self.vendor_mpp = (mx, my)
        self.vendor = "dicom"
        self.properties = {"dicom.backend": "wsidicom", "dicom.levels": str(len(levels))}
        names = []
        if self._slide.labels:
            names.append("label")
        if self._slide.overviews:
            names.append("macro")
        self.associated_names = tuple(names)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        origin = level_origin(location, self.level_downsamples[level])
        dicom_level = self._levels[level]

        def read(x: int, y: int, w: int, h: int) -> np.ndarray:
            arr = self._slide.read_region((x, y), dicom_level, (w, h), as_array=True)
            return composite_straight_rgba(arr) if arr.shape[-1] == 4 else np.ascontiguousarray(arr)

        return paste_clipped(read, origin, (int(size[0]), int(size[1])), self.level_dimensions[level])

    def read_associated(self, name: str) -> np.ndarray:
        img = self._slide.read_label() if name == "label" else self._slide.read_overview()
        return composite_straight_rgba(np.asarray(img.convert("RGBA")))

    def close(self) -> None:
        self._slide.close()
