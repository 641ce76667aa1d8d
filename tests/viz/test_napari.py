"""The napari plugin: the reader claims only wsi-cmaf stores, and layers land in µm where the grid says.

Skipped, with the reason printed, when napari is not installed (``pip install 'wsi-cmaf[napari]'``).
The reader tests use napari's ViewerModel (no Qt, no OpenGL); the Qt viewer test runs
``wsi_cmaf.viz.show`` in a subprocess on a display: ``$DISPLAY``, else a virtual one from
``xvfb-run`` (Debian package xvfb), else it skips with the reason.

Geometry (same store as tests/viz/test_layers.py): slide 2048 x 1536 px at 0.5 µm/px, levels
1, 2, 4; tile (0, 0)'s top-left at level-0 (64, 32) px; tiles 50 px at 4 µm/px = 200 µm = 400 px.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

try:
    with warnings.catch_warnings():  # npe2 uses pydantic-1 style fields: deprecation noise at import
        warnings.simplefilter("ignore", DeprecationWarning)
        import napari  # noqa: F401
        import npe2  # noqa: F401
        from napari.components import ViewerModel
except ImportError as exc:  # the extra is optional: say why these tests do not run
    REASON = f"napari is not installed ({exc}); pip install 'wsi-cmaf[napari]' to run the napari plugin tests"
    print(f"tests/viz/test_napari.py skipped: {REASON}", file=sys.stderr)
    pytest.skip(REASON, allow_module_level=True)

import zarr

from tests.helpers.stores import make_store
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.viz._napari import get_reader

MANIFEST = Path(__file__).resolve().parents[2] / "wsi_cmaf" / "napari.yaml"

# level-0 geometry by hand: µm of the slide's pixel edges and of the tiles
MPP = 0.5
TILE_UM = 200.0
TILE0_EDGE_UM = (32 * MPP, 64 * MPP)                               # (y, x) top-left of tile (0, 0)
TILE0_CENTRE_UM = (TILE0_EDGE_UM[0] + TILE_UM / 2, TILE0_EDGE_UM[1] + TILE_UM / 2)  # (116, 132)


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    """The plugin as napari finds it: from the entry point when installed, else from the manifest."""
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    if "wsi-cmaf" not in {m.name for m in pm.iter_manifests()}:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return pm


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("napari")
    slide = d / "s.tiff"
    write_synthetic_slide(slide, 2048, 1536, MPP, tile=256, downsamples=(1, 2, 4), save_mask=False)
    make_store(d / "s.zarr", slide)
    return slide, d / "s.zarr"


def test_reader_claims_wsi_cmaf_stores_only(tmp_path, pair):
    slide, store = pair
    assert get_reader(str(store)) is not None and get_reader(str(store) + "/") is not None
    assert get_reader(str(slide)) is not None  # a slide routed here (napari asks or --plugin)
    plain = zarr.create_group(str(tmp_path / "other.zarr"), zarr_format=3)
    plain.create_array("0", shape=(4, 4), dtype="float32")
    assert get_reader(str(tmp_path / "other.zarr")) is None  # another zarr store: not ours
    assert get_reader(str(tmp_path)) is None                  # any folder
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "missing.svs")) is None

    from napari.plugins import _npe2

    assert "wsi-cmaf" in _npe2.get_readers(str(store))
    # napari's wording varies by version ("Tried opening with wsi-cmaf, but failed", "Reader 'wsi-cmaf'
    # was selected ... but refused the file"); both are ValueErrors naming the plugin
    with pytest.raises(ValueError, match="wsi-cmaf"):
        ViewerModel().open(str(tmp_path / "other.zarr"), plugin="wsi-cmaf")


def test_manifest_patterns_match_the_reader():
    import npe2

    from wsi_cmaf.viz._napari import SLIDE_SUFFIXES

    (reader,) = npe2.PluginManifest.from_file(MANIFEST).contributions.readers
    assert reader.accepts_directories
    assert set(reader.filename_patterns) == {"*.zarr"} | {f"*{s}" for s in SLIDE_SUFFIXES}


def test_open_store_places_slide_and_heatmap_in_um(pair):
    _, store = pair
    viewer = ViewerModel()
    viewer.open(str(store), plugin="wsi-cmaf")  # the store alone: the slide comes from its provenance
    layers = {layer.name: layer for layer in viewer.layers}
    assert list(layers) == ["s.tiff", "tissue tiles", "benign probability", "malignant probability"]

    s = layers["s.tiff"]
    assert s.multiscale and s.rgb
    np.testing.assert_allclose(s.scale, [MPP, MPP])
    np.testing.assert_allclose(s.translate, [MPP / 2, MPP / 2])
    # µm/px of each level = level-0 µm/px x (level-0 size / level size): 0.5, 1, 2
    np.testing.assert_allclose(np.asarray(s.downsample_factors) * MPP, [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]])
    # pixel centres of the corner pixels: the slide's edges are at 0 and 1536 x 0.5 = 768 µm
    np.testing.assert_allclose(s.extent.world, [[0.25, 0.25], [767.75, 1023.75]])

    for name in ("tissue tiles", "benign probability", "malignant probability"):
        h = layers[name]
        np.testing.assert_allclose(h.scale, [TILE_UM, TILE_UM])
        np.testing.assert_allclose(h.translate, TILE0_CENTRE_UM)  # half a tile past tile (0, 0)'s corner
        # tile (2, 3)'s centre: corner + (index + 1/2) tiles, in µm = level-0 px x 0.5
        centre = h.data_to_world([2, 3])
        np.testing.assert_allclose(centre, [(32 + 2.5 * 400) * MPP, (64 + 3.5 * 400) * MPP])
    hot = layers["malignant probability"]
    assert hot.visible and not layers["benign probability"].visible
    assert tuple(hot.contrast_limits) == (0.0, 1.0)
    assert hot.data[2, 3] == pytest.approx(0.23)
    if hasattr(hot, "units"):  # napari >= 0.6
        assert str(hot.units[0]) == "micrometer" and str(s.units[1]) == "micrometer"


def _display_command() -> list[str] | None:
    """Prefix that gives the subprocess an X display, or None when there is none."""
    if os.environ.get("DISPLAY"):
        return []
    if shutil.which("xvfb-run"):
        return ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24"]
    return None


QT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import npe2
    pm = npe2.PluginManager.instance()
    pm.discover()
    if "wsi-cmaf" not in {m.name for m in pm.iter_manifests()}:
        pm.register(npe2.PluginManifest.from_file(sys.argv[3]))
    from wsi_cmaf.viz import show
    viewer = show(sys.argv[1], sys.argv[2], show=True)  # on the (virtual) display: rendered
    hot = viewer.layers["malignant probability"]
    widget_dock, widget = viewer.window.add_plugin_dock_widget("wsi-cmaf", "Heatmap threshold")
    widget.layer.value = hot
    widget.mode.value = "threshold"
    widget.threshold.value = 0.2
    shot = viewer.screenshot(canvas_only=True, flash=False)
    print(json.dumps({l.name: [list(map(float, l.scale)), list(map(float, l.translate))] for l in viewer.layers}))
    print(json.dumps({"controls": [float(c) for c in hot.colormap.controls], "std": float(shot[..., :3].std()),
                      "scale_bar": bool(viewer.scale_bar.visible)}))
    viewer.close()
""")


def test_show_in_a_qt_viewer_with_threshold_widget(pair, tmp_path):
    prefix = _display_command()
    if prefix is None:
        reason = "no X display for the Qt viewer: set DISPLAY or install xvfb (apt-get install xvfb)"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    slide, store = pair
    script = tmp_path / "qt_show.py"
    script.write_text(QT_SCRIPT)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([*prefix, sys.executable, str(script), str(slide), str(store), str(MANIFEST)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    layers, extra = json.loads(lines[0]), json.loads(lines[1])
    assert layers["s.tiff"] == [[MPP, MPP], [MPP / 2, MPP / 2]]
    assert layers["malignant probability"] == [[TILE_UM, TILE_UM], list(TILE0_CENTRE_UM)]
    assert extra["controls"] == pytest.approx([0.0, 0.2, 1.0])  # the widget's threshold mode
    assert extra["std"] > 1.0 and extra["scale_bar"]           # something was drawn
