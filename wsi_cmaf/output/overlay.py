"""PNG of a heatmap store over the slide thumbnail (matplotlib, Agg, no pyplot state).

Everything is drawn in level-0 slide pixels (or µm when the store does not know the
slide's µm/px), so thumbnail, heatmap, outlines and scale bar line up whatever the
thumbnail's rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from skimage import measure

from wsi_cmaf.errors import OutputError, WsiCmafError
from wsi_cmaf.output.geojson import positive_class, rectilinear
from wsi_cmaf.output.store import HeatmapStore

logger = logging.getLogger(__name__)

TISSUE_COLOUR = "#00c853"
POSITIVE_COLOUR = "#00e5ff"
FAILED_COLOUR = "#ff1744"
FIG_WIDTH_IN = 10.0
#: default resolution of the PNG (dots per inch)
DPI = 150
#: the map's axes take about this share of the figure's width (the rest: colour bar, margins)
AXES_WIDTH_SHARE = 0.8


def background_from(thumb: np.ndarray, dpi: int = DPI) -> np.ndarray | None:
    """``thumb`` (the whole slide, RGB) cut down to what an overlay at ``dpi`` shows, or None.

    None when ``thumb`` is coarser than the map's axes (the overlay then reads a finer picture);
    otherwise box-reduced by the largest integer factor that keeps it at least figure-wide.
    Lets the pipeline reuse its tissue thumbnail instead of decoding the slide again.
    """
    want = int(FIG_WIDTH_IN * dpi)
    longest = max(thumb.shape[:2])
    if longest < AXES_WIDTH_SHARE * want:
        return None
    factor = longest // want
    return np.asarray(Image.fromarray(thumb).reduce(factor)) if factor > 1 else thumb


def _nice_length(span: float) -> float:
    """Largest 1/2/5 × 10^k not above ``span`` (for the scale bar)."""
    if span <= 0:
        return 1.0
    k = np.floor(np.log10(span))
    for m in (5, 2, 1):
        if m * 10 ** k <= span:
            return float(m * 10 ** k)
    return float(10 ** k)


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

        kwargs = {}
        src = store.attrs.get("slide") or {}
        if src.get("mpp_source") == "override" and src.get("mpp"):
            kwargs["mpp"] = tuple(src["mpp"])  # the slide itself has no µm/px
        return stack.enter_context(open_slide(path, **kwargs)), None
    except (ImportError, WsiCmafError, OSError) as exc:
        logger.warning("overlay: cannot open slide %s (%s); drawing the heatmap alone", path, exc)
        return None, f"slide not available ({Path(path).name}): heatmap only"


def _mapping(store: HeatmapStore) -> tuple[Callable, float, str]:
    """(tile index -> plot (x, y), µm per plot unit, unit name)."""
    geo = store.geometry
    if geo.has_level0:
        return geo.tile_to_level0, geo.slide_mpp[0], "level-0 px"
    uy, ux = store.um_per_tile

    def to_um(rows, cols):
        return (np.asarray(cols, float) + 0.5) * ux, (np.asarray(rows, float) + 0.5) * uy

    return to_um, 1.0, "µm"


def _outline(ax, mask: np.ndarray, to_xy: Callable, **style) -> None:
    """Draw the tile-exact outline of ``mask`` (the same rings the GeoJSON export writes)."""
    for contour in measure.find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
        ring = rectilinear(contour) - 1.0
        x, y = to_xy(ring[:, 0], ring[:, 1])
        ax.plot(x, y, **style)


def overlay(
    store_or_path: HeatmapStore | str | Path,
    slide: Any = None,
    out_png: str | Path | None = None,
    *,
    class_index: int | None = None,
    thumbnail_mpp: float | None = None,
    alpha: float = 0.5,
    threshold: float = 0.5,
    cmap: str = "inferno",
    max_size: int | None = None,
    dpi: int = DPI,
    compress_level: int = 1,
    thumbnail: np.ndarray | None = None,
) -> Path:
    """Draw the probability of one class over the slide thumbnail and save it as PNG.

    ``slide``: an open reader, a path, or None for the path recorded in the store; when
    it cannot be opened the heatmap is drawn alone with a note. ``class_index`` defaults
    to the model's positive class. ``thumbnail_mpp`` defaults to the µm/px that makes the
    slide's long side ``max_size`` pixels (default: the figure's width in pixels, the most
    the picture can show). ``thumbnail``: an RGB picture of the whole slide, at any
    resolution, to draw instead of reading one (the pipeline passes its tissue thumbnail).
    ``compress_level`` is the PNG zlib level: 1 writes ~20 % larger
    files than 6 in about half the time. The figure has a colour bar, a legend (tissue
    outline, regions with p >= ``threshold``, failed blocks), a scale bar in mm and, for
    untrained weights, a warning in the title. Returns the PNG path (default: beside the
    store, ``<name>_overlay.png``).
    """
    store = store_or_path if isinstance(store_or_path, HeatmapStore) else HeatmapStore.open(store_or_path)
    out = Path(out_png) if out_png is not None else store.path.with_name(store.path.stem + "_overlay.png")
    fig = render_overlay(store, slide, class_index=class_index, thumbnail_mpp=thumbnail_mpp, alpha=alpha,
                         threshold=threshold, cmap=cmap, max_size=max_size, dpi=dpi, thumbnail=thumbnail)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, pil_kwargs={"compress_level": int(compress_level)})
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from exc
    logger.info("overlay written to %s", out)
    return out


def render_overlay(
    store: HeatmapStore,
    slide: Any = None,
    *,
    class_index: int | None = None,
    thumbnail_mpp: float | None = None,
    alpha: float = 0.5,
    threshold: float = 0.5,
    cmap: str = "inferno",
    max_size: int | None = None,
    dpi: int = DPI,
    thumbnail: np.ndarray | None = None,
) -> Figure:
    """The overlay as a matplotlib Figure (Agg canvas); see :func:`overlay` for the arguments.

    Axis units are level-0 slide pixels (µm when the slide's µm/px is unknown).
    """
    if cmap not in colormaps:
        raise OutputError(f"unknown matplotlib colour map {cmap!r}")
    if not 0.0 <= alpha <= 1.0:
        raise OutputError(f"alpha must be in [0, 1], got {alpha}")
    if thumbnail is not None and (np.ndim(thumbnail) != 3 or np.shape(thumbnail)[2] != 3):
        raise OutputError(f"thumbnail must be an (H, W, 3) RGB image, got shape {np.shape(thumbnail)}")
    k = positive_class(store, class_index)
    name = store.class_names[k]
    prob = store.probabilities(0)[k]
    tissue = store.tissue(0)
    to_xy, um_per_unit, unit = _mapping(store)
    rows, cols = prob.shape
    xs, ys = to_xy(np.array([-0.5, rows - 0.5]), np.array([-0.5, cols - 0.5]))
    left, right, top, bottom = float(xs[0]), float(xs[1]), float(ys[0]), float(ys[1])

    with ExitStack() as stack:
        reader, note = _open_slide(slide, store, stack) if store.geometry.has_level0 else (
            None, "slide µm/px unknown: heatmap only")
        thumb, extent = None, (left, right, bottom, top)
        if reader is not None:
            try:
                w0, h0 = reader.level_dimensions[0]
                if thumbnail is not None:
                    thumb = np.asarray(thumbnail)
                else:
                    # Finer than the figure's own pixels only costs decoding and resampling time.
                    long_side = max_size or int(FIG_WIDTH_IN * dpi)
                    mpp = thumbnail_mpp or max(w0 * reader.mpp[0], h0 * reader.mpp[1]) / long_side
                    thumb = np.asarray(reader.thumbnail(max(mpp, min(reader.mpp))))
                extent = (0.0, float(w0), float(h0), 0.0)
            except (WsiCmafError, OSError) as exc:
                logger.warning("overlay: thumbnail failed (%s); drawing the heatmap alone", exc)
                note = "slide thumbnail unreadable: heatmap only"

    if extent[1] <= extent[0] or extent[2] <= extent[3]:
        extent = (0.0, 1.0, 1.0, 0.0)  # nothing to show: keep matplotlib away from a singular extent
    width_units, height_units = extent[1] - extent[0], extent[2] - extent[3]
    aspect = height_units / max(width_units, 1e-9)
    fig = Figure(figsize=(FIG_WIDTH_IN, float(np.clip(8.6 * aspect + 1.2, 3.0, 14.0))), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if thumb is not None:
        ax.imshow(thumb, extent=extent, interpolation="antialiased")
    else:
        ax.set_facecolor("#f2f2f2")
    if prob.size:  # a slide smaller than one tile has an empty grid
        ax.imshow(np.ma.masked_invalid(prob), extent=(left, right, bottom, top), cmap=cmap,
                  vmin=0.0, vmax=1.0, alpha=alpha, interpolation="nearest")
    handles = []
    if tissue.any():
        _outline(ax, tissue, to_xy, color=TISSUE_COLOUR, linewidth=1.0)
        handles.append(Line2D([], [], color=TISSUE_COLOUR, linewidth=1.5, label="tissue outline"))
    positive = np.nan_to_num(prob, nan=-1.0) >= threshold
    if positive.any():
        _outline(ax, positive, to_xy, color=POSITIVE_COLOUR, linewidth=1.2, linestyle="--")
    handles.append(Line2D([], [], color=POSITIVE_COLOUR, linewidth=1.5, linestyle="--",
                          label=f"p({name}) ≥ {threshold:g}: {int(positive.sum())} tiles"))
    failed = store.failed & ~store.done
    for by, bx in zip(*np.nonzero(failed)):
        rs, cs = store.block_slices((int(by), int(bx)))
        fx, fy = to_xy(np.array([rs.start - 0.5, rs.stop - 0.5]), np.array([cs.start - 0.5, cs.stop - 0.5]))
        ax.add_patch(Rectangle((fx[0], fy[0]), fx[1] - fx[0], fy[1] - fy[0], fill=False,
                               hatch="//", edgecolor=FAILED_COLOUR, linewidth=1.0))
    if failed.any():
        handles.append(Patch(fill=False, hatch="//", edgecolor=FAILED_COLOUR,
                             label=f"failed blocks ({int(failed.sum())})"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.85)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    # the colour bar shows the opaque colour map, not the alpha-blended one
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[cmap]), ax=ax, fraction=0.04, pad=0.02,
                 label=f"p({name})")

    bar_mm = _nice_length(width_units * um_per_unit / 1000.0 * 0.2)
    bar_label = f"{bar_mm:g} mm" if bar_mm >= 1 else f"{bar_mm * 1000:g} µm"
    ax.add_artist(AnchoredSizeBar(ax.transData, bar_mm * 1000.0 / um_per_unit, bar_label, "lower right",
                                  pad=0.5, color="black", frameon=True, size_vertical=max(height_units / 150, 1e-9)))
    if note:
        ax.text(0.01, 0.99, note, transform=ax.transAxes, va="top", ha="left", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    attrs = store.attrs
    model = attrs.get("model") or {}
    slide_name = Path((attrs.get("slide") or {}).get("path") or store.path.stem).name
    title = f"{slide_name} — p({name}), model {model.get('name', '?')}"
    weights = str(model.get("weights_note") or "")
    if weights.lower().startswith("untrained"):
        title += "\nUNTRAINED WEIGHTS — illustration only, not a diagnosis"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"axis units: {unit}", fontsize=7)
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine behind, which makes savefig run a whole
    # extra (invisible) draw, resampling both images again; the layout is final, so drop it.
    fig.set_layout_engine(None)
    return fig
