"""Marker ink and pen marks, told from H&E by hue, saturation and value at the tissue stage's resolution.

H&E is pink (eosin, hue ≈ 0.85-1.0) and purple (haematoxylin, hue ≈ 0.70-0.85) in HSV with hue
in [0, 1). Marker inks sit elsewhere:

- green / cyan marker: hue 0.20-0.55 (H&E has no such hue at any saturation above glass);
- blue marker: hue 0.55-0.70 with saturation ≥ 0.25 (haematoxylin is redder, and pale blue
  glass is unsaturated);
- black marker: value < 0.30 without the hue and saturation of dense haematoxylin (the darkest
  H&E, e.g. epidermis at 8 µm/px, reaches value 0.15 but stays purple and saturated); values
  below the tissue stage's ``min_value`` are missing scanner tiles, not ink, and so is the grey
  rim (within 3 px) of a pure-black gap;
- red marker: hue within 0.03 of red with saturation ≥ 0.85 (eosin and blood are pinker or
  paler; on the real slides here no tissue pixel reaches it).

Isolated ink pixels are dropped by a 3 × 3 opening (a single dark or bluish pixel is stain
noise or an anti-aliased edge, a pen stroke is tens of pixels wide); the strokes that remain are
regrown over the ink pixels connected to them and widened by one pixel, because a stroke's rim
is a blend of ink and tissue that no colour rule calls ink.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: hue ranges and limits in [0, 1] (see the module text)
GREEN_HUE = (0.20, 0.55)
BLUE_HUE = (0.55, 0.70)
BLUE_MIN_SATURATION = 0.25
BLACK_MAX_VALUE = 0.30
HEMATOXYLIN_MIN_SATURATION = 0.25
RED_HUE_HALF_WIDTH = 0.03
RED_MIN_SATURATION = 0.85
#: value below which a pixel is a scanner gap (missing tile, pure black), not marker
SCANNER_GAP_VALUE = 0.03
#: saturation above which a green/cyan pixel is ink rather than glass
GREEN_MIN_SATURATION = 0.05


def _u8(x: float) -> int:
    return int(round(x * 255.0))


def ink_colours(hue: np.ndarray, sat: np.ndarray, val: np.ndarray, min_value: float = 0.12) -> dict[str, np.ndarray]:
    """Boolean masks of green, blue, black and red marker ink from uint8 HSV planes (PIL's 0-255 scale)."""
    hue, sat, val = (np.asarray(a, dtype=np.int16) for a in (hue, sat, val))
    bright = val >= int(np.ceil(min_value * 255.0 - 1e-9))
    green = (hue >= _u8(GREEN_HUE[0])) & (hue <= _u8(GREEN_HUE[1])) & (sat >= _u8(GREEN_MIN_SATURATION))
    blue = (hue > _u8(BLUE_HUE[0])) & (hue <= _u8(BLUE_HUE[1])) & (sat >= _u8(BLUE_MIN_SATURATION))
    hema_like = ((hue >= _u8(BLUE_HUE[1])) | (hue <= _u8(0.05))) & (sat >= _u8(HEMATOXYLIN_MIN_SATURATION))
    black = (val < _u8(BLACK_MAX_VALUE)) & ~hema_like & ~green & ~blue
    gap = val < _u8(SCANNER_GAP_VALUE)
    if gap.any():  # the grey rim of a missing (pure black) scanner tile is not a pen stroke
        black &= ~ndi.binary_dilation(gap, iterations=3)
    red = ((hue <= _u8(RED_HUE_HALF_WIDTH)) | (hue >= _u8(1.0 - RED_HUE_HALF_WIDTH))) & (sat >= _u8(RED_MIN_SATURATION))
    return {name: m & bright for name, m in (("green", green), ("blue", blue), ("black", black), ("red", red))}


def ink_mask(hue: np.ndarray, sat: np.ndarray, val: np.ndarray, min_value: float = 0.12) -> np.ndarray:
    """One boolean mask of marker ink of any colour, isolated pixels removed (3 × 3 opening)."""
    colours = ink_colours(hue, sat, val, min_value)
    raw = colours["green"] | colours["blue"] | colours["black"] | colours["red"]
    square = np.ones((3, 3), bool)
    # strokes are found by their solid cores (a 3 x 3 opening drops lone pixels), then regrown over
    # every ink pixel connected to them and one pixel beyond: a stroke's rim mixes ink with tissue
    cores = ndi.binary_opening(raw, structure=square)
    if not cores.any():
        return cores
    return ndi.binary_dilation(ndi.binary_propagation(cores, structure=square, mask=raw), structure=square)


def ink_mask_from_rgb(rgb: np.ndarray, min_value: float = 0.12) -> np.ndarray:
    """:func:`ink_mask` of an (H, W, 3) uint8 RGB image."""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("HSV"))
    return ink_mask(hsv[..., 0], hsv[..., 1], hsv[..., 2], min_value)
