"""Sane ranges of a model config: sizes and spacings beyond them are a config mistake (or an
attack on memory), refused by name before any model or slide work."""

from __future__ import annotations

from wsi_cmaf.errors import ImplausibleModelConfigError

#: sane ranges of a model config: inputs and patches of at most 4,096 / 8,192 px (a 4,096² float
#: input is 200 MB per tile), patches of at most 10 mm, spacings of 0.01-100 µm/px (the µm/px
#: of slides run from ~0.1 to a few µm/px; coarse tissue maps reach tens)
MAX_INPUT_SIZE, MAX_PATCH_PIXELS, MAX_PATCH_UM, SPACING_RANGE_UM = 4096, 8192, 10_000.0, (0.01, 100.0)


def plausibility_problems(spacing_um_px: float, patch_size_pixels: int, input_size: int) -> list[str]:
    """What is outside the sane ranges (:data:`MAX_INPUT_SIZE` ...) among well-typed values."""
    problems = []
    lo, hi = SPACING_RANGE_UM
    if not (lo <= spacing_um_px <= hi):  # NaN fails this too
        problems.append(f"spacing_um_px {spacing_um_px!r} is outside {lo}-{hi:g} µm/px")
    if input_size > MAX_INPUT_SIZE:
        problems.append(f"input_size {input_size} px is larger than {MAX_INPUT_SIZE} px "
                        f"({3 * 4 * input_size ** 2 / 1e9:.1f} GB of float input per tile)")
    if patch_size_pixels > MAX_PATCH_PIXELS:
        problems.append(f"patch_size_pixels {patch_size_pixels} is larger than {MAX_PATCH_PIXELS} px")
    patch_um = patch_size_pixels * spacing_um_px
    if patch_um > MAX_PATCH_UM:
        problems.append(f"a patch of {patch_size_pixels} px at {spacing_um_px:g} µm/px is {patch_um / 1000:g} mm wide, "
                        f"more than {MAX_PATCH_UM / 1000:g} mm")
    return problems


def check_plausible(spacing_um_px: float, patch_size_pixels: int, input_size: int) -> None:
    """:class:`~wsi_cmaf.errors.ImplausibleModelConfigError` naming every value out of range."""
    problems = plausibility_problems(spacing_um_px, patch_size_pixels, input_size)
    if problems:
        raise ImplausibleModelConfigError("implausible model config: " + "; ".join(problems))
