"""PNG of a heatmap store over the slide thumbnail, drawn with numpy + PIL (no matplotlib figure).

Layout: a header (slide, class, model; an orange "not diagnostic" banner for synthetic or
untrained weights), the map (thumbnail, probability tint whose opacity rises with p, the real
tissue outline from the stored tissue mask, dashed outlines of tiles with p >= threshold,
hatched failed blocks, a scale bar) and a side panel (colour bar, opaque and as seen over
H&E, with the threshold marked; legend). The map is laid out in level-0 slide pixels (µm
when the store does not know the slide's µm/px), so thumbnail, heatmap and outlines line up
whatever the thumbnail's rounding. Provenance goes into the PNG's text chunks.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsi_cmaf.errors import OutputError, WsiCmafError
from wsi_cmaf.output import _draw as D
from wsi_cmaf.output._overlay_panel import draw_header, draw_panel, draw_scale_bar, weights_warning
from wsi_cmaf.output._png import write_png
from wsi_cmaf.output.geojson import positive_class
from wsi_cmaf.output.geometry import slide_size
from wsi_cmaf.output.provenance import export_provenance
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.store_io import is_write_error, write_error

logger = logging.getLogger(__name__)

#: default resolution (dots per inch); ``dpi`` scales every length of the picture
DPI = 150
#: the map fits in this box (w, h) of pixels at DPI; the panel and margins add ~330 px
MAP_BOX = (1180, 1000)
#: kept for callers that size thumbnails: the picture is about this many inches wide at ``dpi``
FIG_WIDTH_IN = 10.0
#: a given background as small as this share of the map is upsampled rather than re-read
UPSAMPLE_LIMIT = 0.5
MODES = ("continuous", "threshold")


def background_from(thumb: np.ndarray, dpi: int = DPI) -> np.ndarray | None:
    """``thumb`` (the whole slide, RGB) cut down to what an overlay at ``dpi`` shows, or None.

    None when ``thumb`` is smaller than half the map (the overlay then reads a finer picture);
    otherwise box-reduced by the largest integer factor that keeps it at least map-sized. A
    thumbnail between half and full map size is upsampled when drawn: a little softer, but it
    saves decoding the slide a second time, the largest fixed cost per slide on GPU nodes.
    """
    want = int(MAP_BOX[0] * dpi / DPI)
    longest = max(thumb.shape[:2])
    if longest < UPSAMPLE_LIMIT * want:
        return None
    factor = longest // want
    return np.asarray(Image.fromarray(thumb).reduce(factor)) if factor > 1 else thumb


_nice_length = D.nice_length  # scale bar rounding (kept under its old name)


@dataclass
class OverlayPicture:
    """The rendered overlay: the picture plus where things are on it (for callers and tests)."""

    image: Image.Image
    #: canvas pixels (x0, y0, x1, y1) of the map
    map_box: tuple[int, int, int, int]
    #: plot units shown by the map: (left, right, bottom, top)
    extent: tuple[float, float, float, float]
    unit: str
    class_name: str
    mode: str
    n_positive: int
    legend: list[str] = field(default_factory=list)
    title: list[str] = field(default_factory=list)
    banner: str | None = None
    note: str | None = None
    outline_source: str = "none"
    png_text: dict[str, str] = field(default_factory=dict)

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """Canvas pixel (x, y) of plot-unit point (x, y)."""
        left, right, bottom, top = self.extent
        x0, y0, x1, y1 = self.map_box
        return x0 + (x - left) / (right - left) * (x1 - x0), y0 + (y - top) / (bottom - top) * (y1 - y0)

    def save(self, path: str | Path, compress_level: int = 1, dpi: int = DPI) -> Path:
        """Write the PNG with its provenance text chunks."""
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_png(out, np.asarray(self.image), self.png_text, dpi=dpi, level=compress_level)
        except OSError as exc:
            if is_write_error(exc):
                raise write_error(exc, out) from exc
            raise OutputError(f"cannot write {out}: {exc}") from exc
        return out


def _open_slide(slide: Any, store: HeatmapStore, stack: ExitStack) -> tuple[Any, str | None]:
    """A reader for ``slide`` (reader object, path, or None = the path recorded in the store).

    Returns (reader or None, note explaining why there is none).
    """
    if slide is not None and not isinstance(slide, (str, Path)):
        return slide, None
    path = slide if slide is not None else (store.attrs.get("slide") or {}).get("path")
    if path is None:
        return None, "slide unknown: heatmap only"
    try:
        from wsi_cmaf.slide.reader import open_slide

        kwargs: dict[str, Any] = {}
        src = store.attrs.get("slide") or {}
        # the file itself has no (or another) µm/px: reopen it with the one the run used
        if src.get("mpp_source") in ("override", "estimated from nuclei") and src.get("mpp"):
            kwargs["mpp"] = tuple(src["mpp"])  # the slide itself has no µm/px
        return stack.enter_context(open_slide(path, **kwargs)), None
    except (ImportError, WsiCmafError, OSError) as exc:
        logger.warning("overlay: cannot open slide %s (%s); drawing the heatmap alone", path, exc)
        return None, f"slide not available ({Path(path).name}): heatmap only"


def overlay(
    store_or_path: HeatmapStore | str | Path,
    slide: Any = None,
    out_png: str | Path | None = None,
    *,
    class_index: int | None = None,
    thumbnail_mpp: float | None = None,
    alpha: float = 0.75,
    threshold: float = 0.5,
    cmap: str = D.DEFAULT_CMAP,
    max_size: int | None = None,
    dpi: int = DPI,
    compress_level: int = 1,
    thumbnail: np.ndarray | None = None,
    mode: str = "continuous",
) -> Path:
    """Draw the probability of one class over the slide thumbnail and save it as PNG.

    ``slide``: an open reader, a path, or None for the path recorded in the store; when it
    cannot be opened the heatmap is drawn alone with a note. ``class_index`` defaults to the
    model's positive class. ``alpha`` is the opacity at p = 1 (it falls with p, see
    :func:`~wsi_cmaf.output._draw.opacity`). ``mode``: "continuous" (colour ramp) or
    "threshold" (only tiles with p >= ``threshold``, one colour at 55 % of ``alpha``). ``cmap``: the default
    teal-yellow ramp (chosen to contrast with H&E) or a matplotlib colour map name.
    ``thumbnail_mpp`` defaults to the µm/px that makes the slide as large as the map
    (``max_size`` pixels on its long side when given). ``thumbnail``: an RGB picture of the
    whole slide to draw instead of reading one (the pipeline passes its tissue thumbnail).
    ``compress_level``: PNG zlib level (1 is fastest). Returns the PNG path (default: beside
    the store, ``<name>_overlay.png``); its text chunks carry the provenance.
    """
    store = store_or_path if isinstance(store_or_path, HeatmapStore) else HeatmapStore.open(store_or_path)
    out = Path(out_png) if out_png is not None else store.path.with_name(store.path.stem + "_overlay.png")
    picture = render_overlay(store, slide, class_index=class_index, thumbnail_mpp=thumbnail_mpp, alpha=alpha,
                             threshold=threshold, cmap=cmap, max_size=max_size, dpi=dpi, thumbnail=thumbnail,
                             mode=mode)
    prov = export_provenance(store, out)
    picture.png_text["wsi_cmaf:provenance"] = json.dumps(prov, sort_keys=True)
    picture.png_text["Creation Time"] = prov["export"]["created_utc"]
    picture.save(out, compress_level=compress_level, dpi=dpi)
    logger.info("overlay written to %s", out)
    return out


def _check(alpha: float, mode: str, thumbnail: np.ndarray | None, threshold: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise OutputError(f"alpha must be in [0, 1], got {alpha}")
    if mode not in MODES:
        raise OutputError(f"overlay mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise OutputError(f"threshold must be in [0, 1], got {threshold}")
    if thumbnail is not None and (np.ndim(thumbnail) != 3 or np.shape(thumbnail)[2] != 3):
        raise OutputError(f"thumbnail must be an (H, W, 3) RGB image, got shape {np.shape(thumbnail)}")


def _grid_axes(store: HeatmapStore) -> tuple[tuple[float, float], tuple[float, float], float, str]:
    """((x, y) of the grid's top-left tile edge, (x, y) stride) in plot units, µm per unit, unit."""
    geo = store.geometry
    if geo.has_level0:
        xs, ys = geo.tile_to_level0(np.array([-0.5, 0.5]), np.array([-0.5, 0.5]))
        start, step = (float(xs[0]), float(ys[0])), (float(xs[1] - xs[0]), float(ys[1] - ys[0]))
        return start, step, geo.require_level0()[0][0], "level-0 px"
    uy, ux = store.um_per_tile
    return (0.0, 0.0), (ux, uy), 1.0, "µm"


def render_overlay(
    store: HeatmapStore,
    slide: Any = None,
    *,
    class_index: int | None = None,
    thumbnail_mpp: float | None = None,
    alpha: float = 0.75,
    threshold: float = 0.5,
    cmap: str = D.DEFAULT_CMAP,
    max_size: int | None = None,
    dpi: int = DPI,
    thumbnail: np.ndarray | None = None,
    mode: str = "continuous",
) -> OverlayPicture:
    """The overlay as an :class:`OverlayPicture` (PIL image + layout); see :func:`overlay`."""
    _check(alpha, mode, thumbnail, threshold)
    lut = D.colour_lut(cmap)
    k = positive_class(store, class_index)
    name = store.class_names[k]
    prob = store.probabilities(0)[k]
    rows, cols = prob.shape
    (gx, gy), (sx, sy), um_per_unit, unit = _grid_axes(store)
    extent = (gx, gx + cols * sx, gy + rows * sy, gy)
    size = slide_size(store.attrs) if store.geometry.has_level0 else None
    if size is not None:  # partial edge tiles reach past the slide: draw nothing beyond it
        extent = (gx, min(extent[1], size[0]), min(extent[2], size[1]), gy)

    thumb, note = None, None
    with ExitStack() as stack:
        reader, note = _open_slide(slide, store, stack) if store.geometry.has_level0 else (
            None, "slide µm/px unknown: heatmap only")
        if reader is not None:
            try:
                w0, h0 = reader.level_dimensions[0]
                extent = (0.0, float(w0), float(h0), 0.0)
                thumb = np.asarray(thumbnail) if thumbnail is not None else None
                if thumb is None:
                    # finer than the map's own pixels only costs decoding and resampling time
                    long_side = max_size or int(max(MAP_BOX) * dpi / DPI)
                    mpp = thumbnail_mpp or max(w0 * reader.mpp[0], h0 * reader.mpp[1]) / long_side
                    thumb = np.asarray(reader.thumbnail(max(mpp, min(reader.mpp))))
            except (WsiCmafError, OSError) as exc:
                logger.warning("overlay: thumbnail failed (%s); drawing the heatmap alone", exc)
                note, thumb = "slide thumbnail unreadable: heatmap only", None

    left, right, bottom, top = extent
    width_u, height_u = max(right - left, 1e-9), max(bottom - top, 1e-9)
    s = dpi / DPI
    if max_size:
        scale = max_size / max(width_u, height_u)
    else:
        scale = min(MAP_BOX[0] * s / width_u, MAP_BOX[1] * s / height_u)
    map_w, map_h = max(1, round(width_u * scale)), max(1, round(height_u * scale))
    # plot-unit centre of every map pixel column / row
    xc = left + (np.arange(map_w) + 0.5) * (width_u / map_w)
    yc = top + (np.arange(map_h) + 0.5) * (height_u / map_h)
    ci, ri = D.cell_index(xc, gx, sx, cols), D.cell_index(yc, gy, sy, rows)

    if thumb is not None and thumb.size:
        base = np.asarray(Image.fromarray(np.ascontiguousarray(thumb, np.uint8)).resize(
            (map_w, map_h), Image.Resampling.BILINEAR))
    else:
        base = np.full((map_h, map_w, 3), 242, np.uint8)
    p = D.lookup(ri, ci, prob, np.nan) if prob.size else np.full((map_h, map_w), np.nan, np.float32)
    positive_tiles = np.nan_to_num(prob, nan=-1.0) >= threshold
    pos_map = np.isfinite(p) & (p >= threshold)
    if mode == "continuous":
        valued = np.isfinite(p)
        pv = p[valued].clip(0.0, 1.0)
        rgb = D.blend_where(base, valued, lut[(pv * 255 + 0.5).astype(np.intp)], D.opacity(pv, alpha))
    else:
        # one flat colour over whole tiles hides the tissue at the continuous mode's top opacity
        rgb = D.blend_where(base, pos_map, np.array(D.THRESHOLD_COLOUR),
                            np.full(int(pos_map.sum()), alpha * D.THRESHOLD_OPACITY))

    lw = max(1, round(2 * s))
    failed = store.failed & ~store.done
    # undecodable tiles inside written blocks are hatched like failed blocks
    bad_tiles = np.asarray(store.failed_tiles, bool)
    if (failed.any() or bad_tiles.any()) and prob.size:
        block_rows, block_cols = store.chunk
        fmap = D.lookup(np.where(ri >= 0, ri // block_rows, -1), np.where(ci >= 0, ci // block_cols, -1), failed, False)
        fmap |= D.lookup(ri, ci, bad_tiles, False)
        hatch = fmap & D.hatch(fmap.shape, max(4, round(8 * s)), lw)
        rgb[hatch | D.edges(fmap, lw)] = D.FAILED_COLOUR

    # slide QC: tiles flagged as out of focus get a red outline (store group ``qc``, when present)
    from wsi_cmaf.qc.report import read_store as read_qc

    qc = read_qc(store)
    blurred = qc["blur"].astype(bool) if qc is not None and qc.get("blur") is not None else None
    if blurred is not None and blurred.shape == prob.shape and blurred.any():
        rgb[D.edges(D.lookup(ri, ci, blurred, False), lw)] = (230, 30, 30)
    outline_source = "none"
    stored_mask = store.tissue_mask() if store.geometry.has_level0 else None
    if stored_mask is not None:
        mask, mask_mpp = stored_mask
        mx, my = store.geometry.require_level0()[0]  # has_level0: a stored mask was read
        mask_map = D.lookup(D.cell_index(yc, 0.0, mask_mpp / my, mask.shape[0]),
                            D.cell_index(xc, 0.0, mask_mpp / mx, mask.shape[1]), mask, False)
        outline_source = "tissue mask"
    else:  # no slide-level mask stored (a store written without the tissue stage): the tiles' footprint
        mask_map = D.lookup(ri, ci, store.tissue(0), False) if prob.size else np.zeros((map_h, map_w), bool)
        outline_source = "tissue tiles"
    rgb[D.edges(mask_map, lw)] = D.TISSUE_LINE
    # p >= threshold: dashed white/black ("marching ants"), visible on any background
    ey, ex = np.nonzero(D.edges(pos_map, lw + 1))
    white = ((ex + ey) // max(3, round(7 * s))) % 2 == 0
    rgb[ey[white], ex[white]] = (255, 255, 255)
    rgb[ey[~white], ex[~white]] = (0, 0, 0)

    attrs = store.attrs
    model = attrs.get("model") or {}
    banner = weights_warning(str(model.get("weights_note") or ""))
    slide_name = Path((attrs.get("slide") or {}).get("path") or store.path.stem).name
    sha = str(model.get("weights_sha256") or "")[:12]
    title = [f"{slide_name} — p({name})",
             f"model {model.get('name', '?')}" + (f" (weights sha256 {sha}…)" if sha else "")
             + f" · {rows}×{cols} tiles of {store.um_per_tile[1]:g} µm"
             + (" · µm/px estimated from nuclei" if (attrs.get("slide") or {}).get("mpp_source")
                == "estimated from nuclei" else "")
             + (f" · {int(blurred.sum())} tiles out of focus (red)" if blurred is not None and blurred.any() else "")]
    canvas, map_box = draw_header(title, banner, map_w, map_h, s)
    canvas.paste(Image.fromarray(rgb), map_box[:2])
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((map_box[0] - 1, map_box[1] - 1, map_box[2], map_box[3]), outline=(120, 120, 120))
    draw_scale_bar(draw, map_box, width_u * um_per_unit, s)
    if note:
        D.text_box(draw, (map_box[0] + 8 * s, map_box[1] + 8 * s), note, D.font(round(13 * s)),
                   background=(255, 255, 230))
    if banner:  # repeated on the map, so a cropped map still carries it
        D.text_box(draw, (map_box[2] - 8 * s, map_box[1] + 8 * s), "NOT DIAGNOSTIC", D.font(round(13 * s), True),
                   fill=(255, 255, 255), background=D.BANNER_COLOUR, anchor="ra")
    legend = draw_panel(canvas, map_box, s, name=name, lut=lut, alpha=alpha, threshold=threshold, mode=mode,
                        n_positive=int(positive_tiles.sum()), n_failed=int(failed.sum()),
                        n_failed_tiles=int(bad_tiles.sum()),
                        outline_source=outline_source, mpp=store.geometry.slide_mpp, unit=unit)
    png_text = {"Title": " ".join(title), "Software": "wsi-cmaf",
                "Source": str((attrs.get("slide") or {}).get("path") or "")}
    if banner:
        png_text["Disclaimer"] = banner
    return OverlayPicture(canvas, map_box, extent, unit, name, mode, int(positive_tiles.sum()), legend, title,
                          banner, note, outline_source, png_text)
