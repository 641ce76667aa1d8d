"""Tile-level fault isolation for whole-level reads (thumbnail and tissue stage).

Scanner files can hold a few undecodable tiles (a flipped byte in a JPEG marker, a cut
transfer). A whole-level read must not give up because of one of them: the bad tile is
painted as background (white, as OpenSlide renders absent tiles), recorded as a
:class:`TileFailure` with its level-0 location, and named in one warning by the caller.
Only a level with no decodable tile at all is fatal
(:class:`~wsi_cmaf.errors.NoDecodableTissueError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.errors import NoDecodableTissueError

logger = logging.getLogger(__name__)

__all__ = ["TileFailure", "Thumbnail", "decode_segments_tolerant", "read_window_tolerant", "thumbnail_failures"]

#: Tile side assumed when a backend does not say how its level is tiled.
DEFAULT_TILE = 256
#: Smallest cell a failed window is re-read in.
_MIN_CELL = 64
#: Failed tiles named one by one in the thumbnail warning (the rest are counted).
_NAMED_FAILURES = 5


@dataclass(frozen=True)
class TileFailure:
    """One tile (or read window) of ``level`` that could not be decoded.

    ``location`` and ``size`` are in level-0 pixels (x, y) / (w, h), so they can be drawn
    on any thumbnail or matched with grid tiles; ``level_box`` is (x, y, w, h) in level px.
    """

    level: int
    location: tuple[int, int]
    size: tuple[int, int]
    level_box: tuple[int, int, int, int]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for run summaries)."""
        return {"level": self.level, "x": self.location[0], "y": self.location[1],
                "width": self.size[0], "height": self.size[1], "reason": self.reason}


def level_failure(level: int, downsample: float, box: tuple[int, int, int, int], reason: str) -> TileFailure:
    """A :class:`TileFailure` from a box in level pixels."""
    x, y, w, h = box
    return TileFailure(
        level=level,
        location=(int(round(x * downsample)), int(round(y * downsample))),
        size=(int(round(w * downsample)), int(round(h * downsample))),
        level_box=(int(x), int(y), int(w), int(h)),
        reason=reason[:300],
    )


def thumbnail_failures(
    path: Path, backend: str, level: int, downsample: float, level_size: tuple[int, int],
    raw: list[tuple[int, int, int, int, str]],
) -> tuple[TileFailure, ...]:
    """Level-0 records of the tiles a thumbnail painted as background (``raw``: level-px boxes
    and reasons). Logs one warning naming them; raises NoDecodableTissueError when no part of
    the level decoded."""
    if not raw:
        return ()
    failures = tuple(level_failure(level, downsample, (x, y, w, h), why) for x, y, w, h, why in sorted(raw))
    lw, lh = level_size
    if sum(f.level_box[2] * f.level_box[3] for f in failures) >= lw * lh:
        raise NoDecodableTissueError(
            path, f"no tile of level {level} ({lw}x{lh} px, read for the thumbnail) could be "
            f"decoded with {backend} ({len(failures)} failed; first: {failures[0].reason}); "
            "the file is corrupt: re-export or re-transfer it")
    named = ", ".join(f"({f.location[0]}, {f.location[1]})" for f in failures[:_NAMED_FAILURES])
    more = f" and {len(failures) - _NAMED_FAILURES} more" if len(failures) > _NAMED_FAILURES else ""
    logger.warning(
        "%s: %d undecodable tile(s) in level %d painted as background in the thumbnail, at "
        "level-0 (x, y) %s%s; first error: %s", path, len(failures), level, named, more, failures[0].reason)
    return failures


class Thumbnail(np.ndarray):
    """An RGB uint8 thumbnail that is a plain numpy array for every use, plus fault facts.

    ``failed_tiles``: the tiles of the level read that could not be decoded (painted as
    background); ``level``: the level it was read from. Arrays derived from it (views,
    copies) keep the attributes; ``np.asarray`` drops them.
    """

    failed_tiles: tuple[TileFailure, ...]
    level: int

    def __new__(cls, array: np.ndarray, failed_tiles: tuple[TileFailure, ...] = (), level: int = 0) -> Thumbnail:
        obj = np.asarray(array).view(cls)
        obj.failed_tiles = tuple(failed_tiles)
        obj.level = int(level)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.failed_tiles = getattr(obj, "failed_tiles", ())
        self.level = getattr(obj, "level", 0)

    def __reduce__(self) -> Any:
        # pickle (dask, multiprocessing) as a plain array: the facts are for the caller only
        return np.asarray(self).__reduce__()


def read_window_tolerant(
    read: Callable[[int, int, int, int], np.ndarray],
    box: tuple[int, int, int, int],
    tile: tuple[int, int],
    errors: tuple[type[BaseException], ...],
    recover: Callable[[], None],
    on_failure: Callable[[tuple[int, int, int, int], str], None],
) -> np.ndarray:
    """Read the level window ``box`` = (x, y, w, h) with ``read``; on a decoding error, re-read
    it cell by cell (cells aligned on the ``tile`` grid) and paint failing cells white.

    ``recover`` is called after every failure (OpenSlide's handle stays in an error state
    until it is reopened). ``on_failure(cell_box, reason)`` is told about each bad cell.
    """
    x, y, w, h = box
    try:
        return read(x, y, w, h)
    except errors:
        recover()
    out = np.full((h, w, 3), 255, np.uint8)
    # cells of at least _MIN_CELL px: a (corrupt) header claiming 1 px tiles must not turn one
    # failed window into millions of reads
    tw, th = max(_MIN_CELL, tile[0]), max(_MIN_CELL, tile[1])
    for cy in range(y - y % th, y + h, th):
        y0, y1 = max(cy, y), min(cy + th, y + h)
        for cx in range(x - x % tw, x + w, tw):
            x0, x1 = max(cx, x), min(cx + tw, x + w)
            try:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = read(x0, y0, x1 - x0, y1 - y0)
            except errors as exc:
                recover()
                on_failure((x0, y0, x1 - x0, y1 - y0), f"{type(exc).__name__}: {exc}")
    return out


def decode_segments_tolerant(
    page: Any,
    errors: tuple[type[BaseException], ...],
    on_failure: Callable[[int, str], None] | None,
    maxworkers: int,
    buffersize: int,
) -> Iterator[tuple[np.ndarray | None, tuple[int, ...], tuple[int, ...]]]:
    """tifffile's ``TiffPage.segments`` for a tiled page, but a tile that fails to decode is
    yielded as absent (``None``) after ``on_failure(tile_index, reason)``; with
    ``on_failure=None`` the error propagates as in tifffile.

    Same order and same decoded pixels as ``page.segments(maxworkers=..., buffersize=...)``.
    """
    keyframe = page.keyframe
    fh = page.parent.filehandle
    decodeargs: dict[str, Any] = {"_fullsize": True}
    if keyframe.compression in {6, 7, 34892, 33007}:  # JPEG flavours need their shared tables
        decodeargs["jpegtables"] = page.jpegtables
        decodeargs["jpegheader"] = keyframe.jpegheader
    decode_func = keyframe.decode
    across = -(-keyframe.imagewidth // keyframe.tilewidth)
    shape = (1, keyframe.tilelength, keyframe.tilewidth, keyframe.samplesperpixel)

    def decode(segment: tuple[bytes | None, int]) -> tuple[np.ndarray | None, tuple[int, ...], tuple[int, ...]]:
        try:
            return decode_func(*segment, **decodeargs)
        except errors as exc:
            if on_failure is None:
                raise
            index = segment[1]
            row, col = divmod(index, across)
            on_failure(index, f"{type(exc).__name__}: {exc}")
            return None, (0, 0, row * shape[1], col * shape[2], 0), shape

    n = int(np.prod(page.chunked))
    chunks = fh.read_segments(page.dataoffsets, page.databytecounts, length=n, lock=fh.lock,
                              sort=False, buffersize=buffersize, flat=False)
    if maxworkers < 2:
        for chunk in chunks:
            yield from map(decode, chunk)
        return
    with ThreadPoolExecutor(maxworkers) as pool:
        for chunk in chunks:
            yield from pool.map(decode, chunk)
