"""``wsi_cmaf.viz.show``: open a slide and its heatmap store in a napari viewer from Python."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_cmaf.errors import MissingDependencyError
from wsi_cmaf.viz.layers import layer_data

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'wsi-cmaf[napari]'"


def import_napari() -> Any:
    """The ``napari`` module, or :class:`MissingDependencyError` saying how to install it."""
    try:
        import napari
    except ImportError as exc:
        raise MissingDependencyError(
            f"napari is not installed ({exc}); install the viewer extra with: {INSTALL_HINT}") from exc
    return napari


def show(slide: Any = None, store: str | Path | Any = None, *, viewer: napari.Viewer | None = None,
         classes: list[str | int] | None = None, mpp: tuple[float, float] | float | None = None,
         show: bool = True) -> napari.Viewer:
    """Show ``slide`` in µm with ``store``'s heatmap overlaid in a napari viewer, and return it.

    Either may be omitted: a store alone shows the slide it recorded (when that file still
    exists), a slide alone shows just the slide. ``viewer``: add to this viewer instead of a new
    one; ``classes``: class names or indices to add (default all, the positive class visible);
    ``mpp``: level-0 µm/px override for a slide without one; ``show``: show the window (False
    for scripts and tests). Call ``napari.run()`` afterwards from a script (not needed in
    IPython/Jupyter with a Qt event loop).
    """
    napari = import_napari()
    from wsi_cmaf.viz._napari import add_layers

    layers = layer_data(slide, store, mpp=mpp, classes=classes)
    if viewer is None:
        viewer = napari.Viewer(show=show, title="wsi-cmaf")
    add_layers(viewer, layers)
    return viewer
