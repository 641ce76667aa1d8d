"""A minimal fast PNG writer for RGB pictures with text chunks.

Why not ``PIL.Image.save``: Pillow tries every PNG row filter on every row, which on the
~1.4 Mpx overlay costs ~100 ms even at zlib level 1, the largest part of the overlay's time.
Here every row uses the "Up" filter (one numpy subtraction) and zlib's run-length strategy:
~2x faster for a file of about the same size (the overlay is mostly flat colour).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from wsi_cmaf.output.store_io import atomic_write_bytes

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    keyword = key.encode("latin-1")[:79]
    if value.isascii():
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    # iTXt: keyword, compression flag + method, language tag, translated keyword, UTF-8 text
    return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(rgb: np.ndarray, text: dict[str, str] | None = None, dpi: float | None = None,
               level: int = 1) -> bytes:
    """PNG bytes of ``rgb`` (H, W, 3 uint8) with ``text`` as tEXt/iTXt chunks and ``dpi`` as pHYs."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png needs an (H, W, 3) uint8 array, got {rgb.shape}")
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the byte above (mod 256)
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    z = zlib.compressobj(int(level), zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = z.compress(filtered.data) + z.flush()
    parts = [_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    if dpi:
        ppm = int(round(dpi / 0.0254))
        parts.append(_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
    parts += [_text_chunk(k, v) for k, v in (text or {}).items()]
    parts += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    return b"".join(parts)


def write_png(path: str | Path, rgb: np.ndarray, text: dict[str, str] | None = None,
              dpi: float | None = None, level: int = 1) -> Path:
    """Write :func:`encode_png` to ``path`` (raises OSError on failure)."""
    path = Path(path)
    atomic_write_bytes(path, encode_png(rgb, text, dpi, level))  # never half a PNG under its name
    return path
