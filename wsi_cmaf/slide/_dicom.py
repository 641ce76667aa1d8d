"""DICOM WSI backends: wsidicom (conformant files and series folders) and a minimal
single-file reader built on pydicom + imagecodecs.

Why hand-rolled: wsidicom (used first) and OpenSlide 4 refuse single DICOM files that
lack the ``ImageType`` VOLUME marker or the shared functional groups, which is common
for files converted by older tools (e.g. ``small_dicom.dcm`` in the test data). This
reader supports exactly what such a file needs and nothing more:

- one tiled instance, ``TILED_FULL`` frame order (row-major frames, no per-frame
  positions), one focal plane, one optical path -> a single pyramid level;
- 8-bit RGB / YBR pixels, JPEG baseline (colour space from the JFIF/Adobe markers, see
  :func:`_jpeg_is_ycbcr`), JPEG 2000 or uncompressed little endian;
- µm/px from ``PixelSpacing`` (shared functional groups) when present.

Anything else raises ``NotImplementedError``/``ValueError`` and the reader reports
the file as unsupported.
"""

from __future__ import annotations

import logging
import struct
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from wsi_cmaf.slide._backends import Backend
from wsi_cmaf.slide._mpp import positive_float
from wsi_cmaf.slide._pixels import composite_straight_rgba, level_origin, paste_clipped

logger = logging.getLogger(__name__)

_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
_NATIVE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


class PydicomBackend(Backend):
    """Frame-indexed reader for one tiled DICOM WSI instance."""

    name = "pydicom"

    def __init__(self, path: Path) -> None:
        import pydicom
        import pydicom.encaps

        self._fp = open(path, "rb")  # noqa: SIM115 (kept open for the reader's lifetime)
        self._lock = threading.Lock()
        try:
            with warnings.catch_warnings():
                # Over-long UI/LO values are common in converted files and harmless here.
                warnings.simplefilter("ignore", UserWarning)
                ds = pydicom.dcmread(self._fp, stop_before_pixels=True)
            if str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS:
                raise ValueError("not a VL Whole Slide Microscopy Image instance")
            if int(ds.get("BitsAllocated", 0)) != 8 or int(ds.get("SamplesPerPixel", 0)) != 3:
                raise NotImplementedError("only 8-bit 3-sample DICOM WSI is supported")
            if str(ds.get("DimensionOrganizationType", "TILED_FULL")) != "TILED_FULL":
                raise NotImplementedError("only TILED_FULL frame organisation is supported")
            self._tile = (int(ds.Columns), int(ds.Rows))
            width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
            self._grid = (-(-width // self._tile[0]), -(-height // self._tile[1]))
            self._n_frames = int(ds.get("NumberOfFrames", 1))
            if self._n_frames != self._grid[0] * self._grid[1]:
                raise NotImplementedError(
                    f"{self._n_frames} frames for a {self._grid[0]}x{self._grid[1]} tile grid "
                    "(several focal planes / optical paths are not supported)"
                )
            self._syntax = str(ds.file_meta.TransferSyntaxUID)
            self._photometric = str(ds.PhotometricInterpretation)
            self._frame_offsets = self._index_frames(pydicom.encaps)
        except BaseException:
            self._fp.close()
            raise
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.vendor = "dicom"
        self.vendor_mpp = _pixel_spacing_um(ds)
        self.objective_power = _objective_power(ds)
        self.properties = {
            "dicom.backend": "pydicom",
            "dicom.transfer-syntax": self._syntax,
            "dicom.photometric": self._photometric,
            "dicom.manufacturer": str(ds.get("Manufacturer", "") or ""),
            "dicom.tile-width": str(self._tile[0]),
            "dicom.tile-height": str(self._tile[1]),
        }
        self.associated_names = ()
        self._decode = lru_cache(maxsize=64)(self._decode_frame)

    # -- frame index ---------------------------------------------------------------
    def _index_frames(self, encaps: object) -> list[tuple[int, int]] | None:
        """(offset, length) of every frame's bytes; None for native (computed on the fly)."""
        fp = self._fp
        (tag,) = struct.unpack("<I", fp.read(4))
        if tag != 0x00107FE0:  # (7FE0,0010) as little-endian group/element words
            raise ValueError("pixel data element not found after the header")
        # Implicit VR: 4-byte length follows; explicit VR: VR(2) + reserved(2) + length(4).
        fp.read(4 if self._syntax == "1.2.840.10008.1.2" else 8)
        self._pixel_start = fp.tell()
        if self._syntax in _NATIVE:
            return None
        if self._syntax != _JPEG_BASELINE and self._syntax not in _JPEG2000:
            raise NotImplementedError(f"transfer syntax {self._syntax} is not supported")
        encaps.parse_basic_offsets(fp)  # type: ignore[attr-defined]
        n_frag, offsets = encaps.parse_fragments(fp)  # type: ignore[attr-defined]
        if n_frag != self._n_frames:
            raise NotImplementedError("multi-fragment frames are not supported")
        out = []
        for off in offsets:
            fp.seek(off)
            _group, _elem, size = struct.unpack("<HHI", fp.read(8))
            out.append((off + 8, size))
        return out

    def _frame_bytes(self, index: int) -> bytes:
        with self._lock:
            if self._frame_offsets is None:
                tw, th = self._tile
                size = tw * th * 3
                self._fp.seek(self._pixel_start + index * size)
                return self._fp.read(size)
            off, size = self._frame_offsets[index]
            self._fp.seek(off)
            data = self._fp.read(size)
        if len(data) != size:
            raise EOFError(f"frame {index} is truncated ({len(data)} of {size} bytes)")
        return data

    def _decode_frame(self, index: int) -> np.ndarray:
        import imagecodecs

        data = self._frame_bytes(index)
        tw, th = self._tile
        if self._frame_offsets is None:
            if len(data) != tw * th * 3:
                raise EOFError(f"frame {index} is truncated")
            return np.frombuffer(data, np.uint8).reshape(th, tw, 3)
        if self._syntax == _JPEG_BASELINE:
            cs = None if _jpeg_is_ycbcr(data, self._photometric) else "RGB"
            arr = imagecodecs.jpeg8_decode(data, colorspace=cs, outcolorspace="RGB")
        else:
            arr = imagecodecs.jpeg2k_decode(data)
        if arr.shape[:2] != (th, tw) or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"frame {index} decoded to shape {arr.shape}, expected {(th, tw, 3)}")
        return arr

    # -- Backend API -----------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        if level != 0:
            raise IndexError(f"level {level} out of range (1 level)")
        origin = level_origin(location, 1.0)
        return paste_clipped(self._read_inside, origin, (int(size[0]), int(size[1])),
                             self.level_dimensions[0])

    def _read_inside(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        tw, th = self._tile
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                frame = self._decode(ty * self._grid[0] + tx)
                fx0, fy0 = max(x, tx * tw), max(y, ty * th)
                fx1, fy1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[fy0 - y : fy1 - y, fx0 - x : fx1 - x] = frame[
                    fy0 - ty * th : fy1 - ty * th, fx0 - tx * tw : fx1 - tx * tw
                ]
        return out

    def read_associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        self._decode.cache_clear()
        self._fp.close()


def _jpeg_is_ycbcr(data: bytes, photometric: str) -> bool:
    """Whether a baseline JPEG frame holds YCbCr (needs the colour transform on decode).

    The JPEG stream's own markers win over the DICOM header: a JFIF APP0 segment
    mandates YCbCr, an Adobe APP14 segment states it (transform flag). Some converters
    write ``PhotometricInterpretation = RGB`` over JFIF/YCbCr frames (the test file
    ``small_dicom.dcm`` does; taking the header literally gives salmon backgrounds).
    Only without either marker does the DICOM photometric interpretation decide.
    """
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE0 and body.startswith(b"JFIF"):
            return True
        if marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12:
            return body[11] != 0
        if marker in (0xC0, 0xC1, 0xC2, 0xDA):  # frame/scan header: no more APP markers
            break
        pos += 2 + length
    return photometric != "RGB"


def _pixel_spacing_um(ds: object) -> tuple[float, float] | None:
    """(x, y) µm/px from SharedFunctionalGroups PixelMeasures (PixelSpacing is row, col in mm)."""
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing  # type: ignore[attr-defined]
        row_mm, col_mm = float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    if row_mm <= 0 or col_mm <= 0:
        return None
    return col_mm * 1000.0, row_mm * 1000.0


def _objective_power(ds: object) -> float | None:
    try:
        value = float(ds.OpticalPathSequence[0].ObjectiveLensPower)  # type: ignore[attr-defined]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


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
            mx, my = positive_float(mpp.width), positive_float(mpp.height)
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
