"""The gallery PNG of a slide explanation: one row per tile, one column per map.

Columns: the tile, (multi-view models) each context view with its attention weight, one saliency
overlay per method, then (CMAF-Net only) the cross-attention and the gate. Every row is labelled
with why the tile was chosen, its probability and its grid row/column. The picture has a fixed
pixel size (:func:`gallery_size`) so it can be checked.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from wsi_cmaf.errors import OutputError
from wsi_cmaf.explain.select import TOP_K
from wsi_cmaf.explain.slide import SlideExplanation

CELL_PX = 200    # side of one map panel
LABEL_PX = 24    # row label strip above the panels
HEADER_PX = 130  # title (up to three lines) and column titles
DPI = 100

_TITLES = {"ig": "Integrated Gradients", "occlusion": "Occlusion", "gradcam": "Grad-CAM, spatial branch"}


def gallery_columns(expl: SlideExplanation) -> list[str]:
    """Column keys: ``tile``, ``view<v>`` per context view, each saliency map name, then
    ``attention`` / ``gate`` when present."""
    cols = ["tile", *(f"view{v}" for v in range(1, 1 + len(expl.context or ()))), *expl.saliency]
    return cols + [k for k in ("attention", "gate") if getattr(expl, k) is not None]


def gallery_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a gallery with ``n_rows`` tiles and ``n_cols`` columns."""
    return n_cols * CELL_PX, HEADER_PX + n_rows * (LABEL_PX + CELL_PX)


def _column_title(key: str, expl: SlideExplanation) -> str:
    """Two or three short lines: a column is only CELL_PX wide."""
    if key == "tile":
        return f"tile\n{expl.tile_um:g} µm wide"
    if key.startswith("view") and expl.views is not None:
        v = expl.views[int(key[4:])]
        return f"context, view {key[4:]}\n{v['size'] * v['mpp']:g} µm wide\n(weight: gated attention)"
    if key == "attention":
        if expl.tau is None:
            return "cross-attention received\n(mean over heads)"
        tau = ", ".join(f"{t:.2f}" for t in expl.tau)
        return f"cross-attention received\nmean of {len(expl.tau)} heads\nτ = {tau}"
    if key == "gate":
        return "gate, scale 0-1\nyellow = fused features\ndark = spatial branch"
    method, _, nt = key.partition("_")
    title = _TITLES.get(method, key) + (f" + {nt}" if nt else "")
    if method == "gradcam":  # ReLU'd: no negative evidence to show
        return f"{title}\nred = evidence for {expl.class_names[expl.positive_class]}"
    return f"{title}\nred = for {expl.class_names[expl.positive_class]}\nblue = against"


def _row_label(expl: SlideExplanation, i: int) -> str:
    ch = expl.choice
    why = f"top-{sum(r == TOP_K for r in ch.reason)}" if ch.reason[i] == TOP_K else "near threshold"
    return (f"#{i + 1} {why}  p({expl.class_names[expl.positive_class]})={ch.probability[i]:.3f}  "
            f"row {ch.rows[i]}, col {ch.cols[i]}")


def render_gallery(expl: SlideExplanation, out: str | Path) -> Path:
    """Draw the gallery of ``expl`` into the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = gallery_columns(expl)
    n = len(expl.choice)
    width, height = gallery_size(n, len(cols))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    s = expl.map_size[0]
    extent = (0, s, s, 0)
    title = (f"{Path(expl.slide).name}: {n} tiles, threshold {expl.threshold:g}, model {expl.model['name']}"
             + ("" if expl.is_cmaf else f". {expl.cmaf_note}"))
    fig.text(4 / width, 1 - 6 / height, textwrap.fill(title, max(30, width // 7)), va="top", ha="left",
             fontsize=9, weight="bold", linespacing=1.2)
    for j, key in enumerate(cols):
        fig.text((j + 0.5) / len(cols), 1 - 62 / height, _column_title(key, expl), ha="center", va="top",
                 fontsize=8.5, linespacing=1.25)
    pad = 6
    for i in range(n):
        top = HEADER_PX + i * (LABEL_PX + CELL_PX)
        fig.text(4 / width, 1 - (top + LABEL_PX * 0.55) / height, _row_label(expl, i), va="center",
                 ha="left", fontsize=9, family="monospace")
        grey = expl.tiles[i].mean(axis=2)
        for j, key in enumerate(cols):
            y0 = 1 - (top + LABEL_PX + CELL_PX - pad) / height
            ax = fig.add_axes((j / len(cols) + pad / width, y0, (CELL_PX - 2 * pad) / width,
                               (CELL_PX - 2 * pad) / height))
            ax.set_axis_off()
            if key == "tile":
                ax.imshow(expl.tiles[i], extent=extent, interpolation="bilinear")
                continue
            if key.startswith("view") and expl.context is not None:
                v = int(key[4:])
                ax.imshow(expl.context[v - 1][i], extent=extent, interpolation="bilinear")
                w = float(expl.view_weights[i, v]) if expl.view_weights is not None else float("nan")
                ax.text(2, s - 2, "missing (off the slide)" if w == 0 else f"weight {w:.2f}", color="white",
                        fontsize=7.5, va="bottom", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
                continue
            ax.imshow(grey, cmap="gray", extent=extent, vmin=0, vmax=255, interpolation="bilinear")
            if key == "gate":
                assert expl.gate is not None  # the column is there only with a gate
                ax.imshow(expl.gate[i], cmap="cividis", vmin=0, vmax=1, alpha=0.75, extent=extent)
                g = expl.gate[i]
                ax.text(2, s - 2, f"mean {g.mean():.2f} ({g.min():.2f}-{g.max():.2f})", color="white",
                        fontsize=7.5, va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
            elif key == "attention":
                assert expl.attention is not None  # the column is there only with attention maps
                a = expl.attention[i]
                ax.imshow(a, cmap="viridis", vmin=float(a.min()), vmax=float(a.max()), alpha=0.7, extent=extent)
            else:
                m = expl.saliency[key][i]
                lim = float(np.percentile(np.abs(m), 99)) or 1.0  # one bright pixel must not wash out the rest
                ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.7, extent=extent)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI, facecolor="white")
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from exc
    return out
