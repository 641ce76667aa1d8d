"""Header, side panel (colour bar + legend) and scale bar of the overlay PNG, drawn with PIL."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from wsi_cmaf.output import _draw as D

MARGIN = 16
PANEL_WIDTH = 300


def weights_warning(note: str) -> str | None:
    """The banner text when the weights' note says they are synthetic or untrained, else None."""
    low = note.lower()
    if "untrained" in low or "random init" in low:
        return "UNTRAINED WEIGHTS (random init) — illustration only, NOT DIAGNOSTIC"
    if "synthetic" in low:
        return "SYNTHETIC WEIGHTS — trained on synthetic slides only, NOT DIAGNOSTIC"
    return None


def draw_header(title: list[str], banner: str | None, map_w: int, map_h: int,
                s: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A white canvas sized for the map and panel, with the title (and banner) drawn.

    Returns (canvas, map box (x0, y0, x1, y1)).
    """
    m = round(MARGIN * s)
    title_h = round(24 * s) + round(19 * s) * (len(title) - 1)
    banner_h = round(32 * s) if banner else 0
    top = m + title_h + (banner_h + round(8 * s) if banner else 0) + round(8 * s)
    width = m + map_w + m + round(PANEL_WIDTH * s)
    height = top + max(map_h, round(430 * s)) + m
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = m
    for i, line in enumerate(title):
        fnt = D.font(round((17 if i == 0 else 13) * s), bold=i == 0)
        draw.text((m, y), line, font=fnt, fill=(0, 0, 0))
        y += round((24 if i == 0 else 19) * s)
    if banner:
        y += round(4 * s)
        draw.rectangle((m, y, width - m, y + banner_h), fill=D.BANNER_COLOUR)
        draw.text((width // 2, y + banner_h // 2), banner, font=D.font(round(15 * s), bold=True),
                  fill=(255, 255, 255), anchor="mm")
    return canvas, (m, top, m + map_w, top + map_h)


def draw_scale_bar(draw: ImageDraw.ImageDraw, map_box: tuple[int, int, int, int], width_um: float, s: float) -> None:
    """A scale bar (1/2/5 × 10^k mm or µm, about a fifth of the map) in the map's lower left."""
    x0, y0, x1, y1 = map_box
    if width_um <= 0:
        return
    bar_um = D.nice_length(width_um * 0.2 / 1000.0) * 1000.0
    length = bar_um / width_um * (x1 - x0)
    label = f"{bar_um / 1000:g} mm" if bar_um >= 1000 else f"{bar_um:g} µm"
    pad, fnt = round(8 * s), D.font(round(13 * s))
    bx, by = x0 + round(12 * s), y1 - round(12 * s)
    th = round(5 * s)
    text_h = fnt.getbbox(label)[3] if hasattr(fnt, "getbbox") else 12
    draw.rectangle((bx - pad, by - th - text_h - 3 * pad // 2, bx + length + pad, by + pad // 2), fill=(255, 255, 255))
    draw.rectangle((bx, by - th, bx + length, by), fill=(0, 0, 0))
    draw.text((bx + length / 2, by - th - pad // 2), label, font=fnt, fill=(0, 0, 0), anchor="mb")


def _sample_line(draw, x: int, y: int, w: int, s: float, kind: str) -> None:
    lw = max(1, round(2 * s))
    if kind == "tissue":
        draw.rectangle((x, y - lw // 2, x + w, y + lw - lw // 2), fill=D.TISSUE_LINE)
    elif kind == "positive":
        step = max(3, round(7 * s))
        for i, xs in enumerate(range(x, x + w, step)):
            draw.rectangle((xs, y - lw, min(x + w, xs + step), y + lw),
                           fill=(0, 0, 0) if i % 2 else (255, 255, 255), outline=(0, 0, 0) if i % 2 == 0 else None)
    elif kind == "failed":
        h = round(12 * s)
        draw.rectangle((x, y - h // 2, x + w, y + h // 2), outline=D.FAILED_COLOUR, width=lw)
        for xs in range(x, x + w, max(3, round(6 * s))):
            draw.line((xs, y + h // 2, min(x + w, xs + h), y - h // 2), fill=D.FAILED_COLOUR, width=1)
    elif kind == "none":
        h = round(12 * s)
        draw.rectangle((x, y - h // 2, x + w, y + h // 2), fill=(255, 255, 255), outline=(150, 150, 150))


def draw_panel(canvas: Image.Image, map_box: tuple[int, int, int, int], s: float, *, name: str,
               lut: np.ndarray, alpha: float, threshold: float, mode: str, n_positive: int, n_failed: int,
               outline_source: str, n_failed_tiles: int = 0, mpp: tuple[float, float] | None, unit: str) -> list[str]:
    """Colour bar (or threshold swatch) and legend right of the map; returns the legend lines."""
    draw = ImageDraw.Draw(canvas)
    x = map_box[2] + round(MARGIN * s)
    y = map_box[1]
    small, body, head = D.font(round(11 * s)), D.font(round(12 * s)), D.font(round(15 * s), bold=True)
    draw.text((x, y), f"p({name})", font=head, fill=(0, 0, 0))
    y += round(28 * s)
    col_w = round(22 * s)
    if mode == "continuous":
        bar_h = int(np.clip((map_box[3] - map_box[1]) * 0.45, 200 * s, 320 * s))
        ps = np.linspace(1.0, 0.0, bar_h)  # top = 1
        colours = lut[np.round(ps * 255).astype(np.intp)]
        on_tissue = D.blend(np.broadcast_to(np.array(D.HE_PINK, np.uint8), colours.shape), colours,
                            D.opacity(ps, alpha))
        strip = np.concatenate([np.repeat(colours[:, None], col_w, 1), np.full((bar_h, 2, 3), 255, np.uint8),
                                np.repeat(on_tissue[:, None], col_w, 1)], axis=1)
        draw.text((x, y), "left: colour · right: as on H&E", font=small, fill=(60, 60, 60))
        y += round(16 * s)
        canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (x, y))
        bar_x1 = x + strip.shape[1]
        draw.rectangle((x - 1, y - 1, bar_x1, y + bar_h), outline=(90, 90, 90))
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            ty = y + round((1 - t) * (bar_h - 1))
            draw.line((bar_x1, ty, bar_x1 + round(5 * s), ty), fill=(0, 0, 0))
            draw.text((bar_x1 + round(8 * s), ty), f"{t:g}", font=body, fill=(0, 0, 0), anchor="lm")
        ty = y + round((1 - threshold) * (bar_h - 1))
        dash = max(2, round(4 * s))
        for i, xs in enumerate(range(x - round(4 * s), bar_x1 + round(4 * s), dash)):
            draw.line((xs, ty, xs + dash, ty), fill=(0, 0, 0) if i % 2 else (255, 255, 255), width=max(1, round(2 * s)))
        draw.text((bar_x1 + round(44 * s), ty), f"◀ threshold {threshold:g}", font=small, fill=(0, 0, 0), anchor="lm")
        y += bar_h + round(10 * s)
        draw.text((x, y), f"opacity rises with p (max {alpha:g})", font=small, fill=(60, 60, 60))
        y += round(24 * s)
    else:
        sw = round(26 * s)
        swatch = D.blend(np.full((sw, sw, 3), D.HE_PINK, np.uint8), np.array(D.THRESHOLD_COLOUR),
                         np.full((sw, sw), alpha * D.THRESHOLD_OPACITY, np.float32))
        canvas.paste(Image.fromarray(swatch), (x, y))
        draw.text((x + sw + round(8 * s), y + sw // 2), f"p ≥ {threshold:g} (on H&E)", font=body,
                  fill=(0, 0, 0), anchor="lm")
        y += sw + round(18 * s)
    outline_text = "tissue outline (tissue mask)" if outline_source == "tissue mask" else "tissue tiles (outline)"
    items = [("tissue", outline_text), ("positive", f"p ≥ {threshold:g}: {n_positive} tiles")]
    if n_failed:
        items.append(("failed", f"failed blocks ({n_failed})"))
    if n_failed_tiles:
        items.append(("failed", f"undecodable tiles ({n_failed_tiles})"))
    items.append(("none", "no tint: no tissue tile / no value"))
    sample_w = round(30 * s)
    for kind, text in items:
        _sample_line(draw, x, y + round(7 * s), sample_w, s, kind)
        draw.text((x + sample_w + round(8 * s), y + round(7 * s)), text, font=body, fill=(0, 0, 0), anchor="lm")
        y += round(22 * s)
    if mpp is not None:
        draw.text((x, y + round(6 * s)), f"slide {mpp[0]:.3f} µm/px; map in {unit}", font=small, fill=(90, 90, 90))
    return [text for _, text in items]
