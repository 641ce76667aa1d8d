"""Raw JPEG tiles of a TIFF/SVS pyramid level, as complete streams any JPEG decoder can read.

Device-side decoding (:mod:`wsi_cmaf.infer.device_decode`) hands the compressed tiles of a
pyramid level straight to ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on CPU)
instead of decoding them through a slide backend. This module finds such levels and reads their
tiles with tifffile:

* :func:`jpeg_level` checks that a level is a tiled, 8-bit, 3-sample, contiguous JPEG level whose
  size matches what the slide reader reports, and describes it (:class:`JpegLevel`); anything else
  (JPEG 2000, DICOM, uncompressed, strips) raises :class:`NotJpegTiledError` saying why.
* :class:`JpegTileReader` reads the bytes of chosen tiles (``page.dataoffsets`` /
  ``databytecounts``) and makes each a stand-alone stream (:func:`complete_stream`): the level's
  shared ``JPEGTables`` are merged in, and for RGB-coded tiles (TIFF photometric 2, as Aperio
  writes them) an Adobe APP14 marker says that the components are RGB. Without that marker a
  stand-alone decoder applies the YCbCr->RGB transform and ruins the colours; tifffile avoids it by
  passing the colour space to its codec, and the marker does the same for any decoder.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from wsi_cmaf.errors import UnsupportedSlideError

logger = logging.getLogger(__name__)

__all__ = ["ADOBE_RGB", "JpegLevel", "JpegTileReader", "NotJpegTiledError", "complete_stream", "jpeg_level"]

#: APP14 "Adobe" segment with transform 0: the components are RGB, not YCbCr.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_JPEG = 7  # TIFF compression tag value of "new-style" JPEG
_RGB, _YCBCR = 2, 6
_HAS_ADOBE = re.compile(rb"\xff\xee..Adobe", re.DOTALL)


class NotJpegTiledError(UnsupportedSlideError):
    """A slide level is not made of JPEG tiles that a stand-alone decoder can read."""


@dataclass(frozen=True)
class JpegLevel:
    """One JPEG-tiled pyramid level: ``size`` (w, h) and ``tile`` (w, h) in level px.

    ``level`` indexes ``tifffile.TiffFile(path).series[0].levels``; ``jpegtables`` are the level's
    shared tables (None when every tile carries its own); ``photometric`` is the TIFF tag (2 RGB,
    6 YCbCr). Picklable, so reader tasks on other processes can be given it.
    """

    path: str
    level: int
    size: tuple[int, int]
    tile: tuple[int, int]
    photometric: int
    jpegtables: bytes | None

    @property
    def across(self) -> int:
        """Storage tiles per row of the level."""
        return -(-self.size[0] // self.tile[0])

    @property
    def down(self) -> int:
        """Storage tile rows of the level."""
        return -(-self.size[1] // self.tile[1])

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) level px of storage tile ``index``, cut at the level's right and bottom edge."""
        row, col = divmod(index, self.across)
        x, y = col * self.tile[0], row * self.tile[1]
        return x, y, min(self.tile[0], self.size[0] - x), min(self.tile[1], self.size[1] - y)

    def tile_index(self, col: int, row: int) -> int:
        """Index (raster order) of the storage tile at column ``col``, row ``row``."""
        return row * self.across + col


def jpeg_level(path: str | Path, level: int, size: tuple[int, int] | None = None) -> JpegLevel:
    """Describe ``level`` of ``path`` for raw-tile decoding, or raise :class:`NotJpegTiledError`.

    ``size`` (w, h): the level size the slide reader reports; a tifffile level of another size is
    refused, so tile indices can never point into a different pyramid than the one analysed.
    """
    import tifffile

    try:
        tif = tifffile.TiffFile(str(path))
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise NotJpegTiledError(path, f"not a TIFF file tifffile can read ({exc})") from exc
    with tif:
        levels = tif.series[0].levels if tif.series else []
        if not 0 <= level < len(levels):
            raise NotJpegTiledError(path, f"tifffile finds {len(levels)} pyramid level(s), not level {level}")
        page = levels[level].keyframe
        why = _unsupported(page)
        if why:
            raise NotJpegTiledError(path, f"level {level} {why}")
        found = (int(page.imagewidth), int(page.imagelength))
        if size is not None and tuple(int(v) for v in size) != found:
            raise NotJpegTiledError(path, f"level {level} is {found[0]}x{found[1]} px in tifffile but "
                                          f"{size[0]}x{size[1]} px in the slide reader")
        tables = page.jpegtables
        return JpegLevel(str(path), level, found, (int(page.tilewidth), int(page.tilelength)),
                         int(page.photometric), bytes(tables) if tables is not None else None)


def _unsupported(page) -> str | None:
    """Why the keyframe ``page`` cannot be decoded tile by tile as plain JPEG, or None."""
    if page.compression != _JPEG:
        return f"is not JPEG-compressed (TIFF compression {int(page.compression)})"
    if not page.is_tiled:
        return "is stored in strips, not tiles"
    if page.samplesperpixel != 3 or page.bitspersample != 8:
        return f"has {page.samplesperpixel} samples of {page.bitspersample} bits, not 3 of 8"
    if page.planarconfig != 1:
        return "stores its colour planes separately"
    if page.photometric not in (_RGB, _YCBCR):
        return f"has TIFF photometric {int(page.photometric)}, not RGB or YCbCr"
    if getattr(page, "imagedepth", 1) != 1:
        return "is a volume (image depth > 1)"
    return None


def complete_stream(data: bytes, jpegtables: bytes | None, rgb: bool) -> bytes:
    """One tile's bytes as a stand-alone JPEG stream: tables merged in, APP14 added for RGB tiles.

    TIFF's abbreviated JPEG is a tables stream (SOI..EOI) and a tile stream (SOI..EOI); joined
    without the inner EOI/SOI they form one stream. An RGB-coded tile that does not say so already
    gets :data:`ADOBE_RGB` right after its SOI.
    """
    if jpegtables is not None and len(jpegtables) > 4:
        data = jpegtables[:-2] + data[2:]
    if rgb:
        sos = data.find(b"\xff\xda")
        if not _HAS_ADOBE.search(data, 0, sos if sos > 0 else len(data)):
            data = data[:2] + ADOBE_RGB + data[2:]
    return data


class JpegTileReader:
    """Reads complete JPEG streams of chosen tiles of a :class:`JpegLevel` (one file handle).

    Not thread-safe (tifffile's handle has one file position): use one per thread
    (:func:`thread_reader`).
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = str(path)
        self._tif = tifffile.TiffFile(self.path)

    def read(self, level: JpegLevel, indices: list[int]) -> list[bytes | None]:
        """Streams of tiles ``indices`` of ``level`` (None for a tile the file does not store)."""
        page = self._tif.series[0].levels[level.level].keyframe
        offsets, counts = page.dataoffsets, page.databytecounts
        fh = self._tif.filehandle
        rgb = level.photometric == _RGB
        out: dict[int, bytes | None] = {}
        for i in sorted(indices, key=lambda j: offsets[j]):  # in file order: sequential reads
            if counts[i] == 0:
                out[i] = None
                continue
            fh.seek(offsets[i])
            out[i] = complete_stream(fh.read(counts[i]), level.jpegtables, rgb)
        return [out[i] for i in indices]

    def close(self) -> None:
        """Close the file."""
        self._tif.close()


_local = threading.local()


def thread_reader(path: str | Path) -> JpegTileReader:
    """The calling thread's :class:`JpegTileReader` of ``path``, opened on first use (a few kept)."""
    cache: dict[str, JpegTileReader] | None = getattr(_local, "readers", None)
    if cache is None:
        cache = _local.readers = {}
    key = str(path)
    reader = cache.get(key)
    if reader is None:
        if len(cache) >= 4:  # a worker of a batch moves on to other slides
            drop_thread_readers()
        reader = cache[key] = JpegTileReader(key)
    return reader


def drop_thread_readers() -> None:
    """Close the calling thread's readers (after a failed read, or when moving on)."""
    cache = getattr(_local, "readers", {})
    for reader in cache.values():
        try:
            reader.close()
        except OSError:
            logger.debug("closing a raw JPEG tile reader raised", exc_info=True)
    cache.clear()
