"""How an image file listed in a manifest reaches the model: its pixel geometry.

Two kinds of manifest image exist, and they need different treatment:

* **Tiles at the model's µm/px** (IDC: 50 × 50 px at about 4 µm/px, the size the model's
  ``patch_size_pixels`` names). These are used as they are; the few IDC edge patches that are
  smaller are padded with white (bottom/right), so every pixel keeps its µm/px. The batch
  pipeline then resizes the tile to the model's input, exactly as inference does.
* **Whole images larger than a tile** (BreakHis: 700 × 460 px at 40×-400×). These are resized
  whole, both axes, to the model's input size with antialiased bicubic filtering (Pillow), so the
  model sees the whole field of view. This is what the paper evidently did ("we resize patches to
  224×224 using bicubic interpolation"); resampling BreakHis to IDC's 4 µm/px instead would leave
  a 400× image (about 0.06 µm/px) about 9 px wide, nothing to tile. MODEL.md ("BreakHis
  geometry") gives the reasoning.

Nothing is ever cropped: a larger image met in ``"tile"`` geometry is an
:class:`~wsi_cmaf.errors.ImageGeometryError` rather than its central patch.

Geometries: ``"tile"``, ``"resize"`` and ``"auto"`` (the default), which reads the headers of up
to :data:`PROBE_IMAGES` images spread over the manifest and picks ``"resize"`` when any is
larger than a tile. In ``"resize"`` geometry tile-sized images are padded to the tile and then
resized to the same output size, so a mixed manifest still gives batches of one shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_cmaf.errors import ConfigError, ImageGeometryError

logger = logging.getLogger(__name__)

GEOMETRIES = ("auto", "tile", "resize")
#: images whose headers ``"auto"`` reads (evenly spaced over the manifest, first and last included)
PROBE_IMAGES = 64


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header only."""
    from PIL import Image

    with Image.open(path) as im:
        return int(im.height), int(im.width)


def decide_geometry(paths: Sequence[str | Path], patch_size: int, geometry: str = "auto") -> str:
    """``"tile"`` or ``"resize"`` for a manifest's images; ``"auto"`` probes their sizes."""
    if geometry not in GEOMETRIES:
        raise ConfigError(f"image geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if geometry != "auto" or not len(paths):
        return "tile" if geometry == "auto" else geometry
    picks = np.unique(np.linspace(0, len(paths) - 1, min(PROBE_IMAGES, len(paths))).round().astype(int))
    for i in picks:
        try:
            h, w = image_hw(paths[i])
        except OSError:  # unreadable files are the manifest check's business, reported there
            continue
        if h > patch_size or w > patch_size:
            logger.info("images such as %s are %dx%d px, larger than the %d px tile: each is resized whole "
                        "to the model input", paths[i], w, h, patch_size)
            return "resize"
    return "tile"


def _pad(arr: np.ndarray, size: int, pad_value: int) -> np.ndarray:
    out = np.full((size, size, 3), pad_value, np.uint8)
    out[:arr.shape[0], :arr.shape[1]] = arr
    return out


def load_image(path: str | Path, patch_size: int, *, geometry: str = "tile", out_size: int | None = None,
               pad_value: int = 255) -> np.ndarray:
    """Decode an image to uint8 RGB (S, S, 3) by the rule of the module docstring.

    ``geometry="tile"``: S = ``patch_size``; tile-sized images as they are, smaller ones padded,
    larger ones refused. ``geometry="resize"``: S = ``out_size`` (default ``patch_size``); images
    larger than a tile in either axis are resized whole, the others padded to the tile first.
    """
    from PIL import Image

    if geometry not in ("tile", "resize"):
        raise ConfigError(f"load_image geometry must be 'tile' or 'resize' (decide 'auto' first), got {geometry!r}")
    size = int(out_size or patch_size) if geometry == "resize" else int(patch_size)
    with Image.open(path) as im:
        im = im.convert("RGB")
        large = im.height > patch_size or im.width > patch_size
        if large and geometry == "tile":
            raise ImageGeometryError(
                f"{path} is {im.width}x{im.height} px, larger than the model's {patch_size} px tile; a tile would "
                "be a crop of it. Set data.image_geometry: resize (or auto) to resize each image whole")
        if large:
            return np.array(im.resize((size, size), Image.Resampling.BICUBIC))
        arr = np.array(im)  # writable copy (torch.from_numpy needs one)
    if arr.shape[:2] != (patch_size, patch_size):
        arr = _pad(arr, patch_size, pad_value)
    if size != patch_size:
        arr = np.array(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC))
    return arr
