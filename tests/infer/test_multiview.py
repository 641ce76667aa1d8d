"""Multi-view models in analyze_slide (issue 17, items 1-2, engine side).

A 2-view model (the 50 px tile at 4 µm/px plus 50 px of context at 16 µm/px) runs on a small
synthetic slide: every block is read once per view, never per tile; tiles whose context leaves the
slide get a missing view, and because the model masks missing views their probabilities do not
change when the padded context pixels are replaced.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch

from tests.helpers.multiview import MODEL_CFG, VIEWS, saved_multiview_model, views_by_hand
from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer import dask_tasks as engine_tasks
from wsi_cmaf.infer import multiview as engine_views
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.models import create_model
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.slide.views import read_block_views

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=32, overlay=False, geojson=False,
                      compile="off", precision="off")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    # 2400 x 1600 µm: 12 x 8 tiles of 200 µm; the 800 µm context of tiles in the outer two rows
    # and columns leaves the slide (centre 200 c + 100 µm closer than 400 µm to an edge)
    return write_synthetic_slide(tmp_path_factory.mktemp("mv") / "s.tiff", 4800, 3200, 0.5, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_multiview_model(tmp_path_factory.mktemp("model") / "mv")


class CountingReader:
    """Delegates to a reader and counts its read_region calls."""

    def __init__(self, reader) -> None:
        self._reader, self.reads = reader, 0

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def read_region(self, *args, **kwargs):
        self.reads += 1
        return self._reader.read_region(*args, **kwargs)


@pytest.fixture(scope="module")
def counted_run(slide, model_dir, tmp_path_factory):
    """The run, with each block's reads counted and the per-tile read path forbidden."""
    calls: list[tuple[tuple[int, int], int, int]] = []
    lock = threading.Lock()
    original = engine_views.read_block_views

    def counting(reader, grid, block, specs, **kw):
        proxy = CountingReader(reader)
        out = original(proxy, grid, block, specs, **kw)
        inside_views = int((~out.missing).any(axis=0).sum())
        with lock:
            calls.append((block.index, proxy.reads, inside_views))
        return out

    def no_tile_reads(*a, **k):
        raise AssertionError("a multi-view model must not use the tile block read")

    mp = pytest.MonkeyPatch()
    mp.setattr(engine_views, "read_block_views", counting)
    mp.setattr(engine_tasks, "read_block", no_tile_reads)
    try:
        res = analyze_slide(slide.path, model=model_dir[0], out=tmp_path_factory.mktemp("run"), config=CFG)
    finally:
        mp.undo()
    return res, calls


def _hand(slide_path, store, model, rows, cols, missing_override=None):
    """Probabilities of tiles (rows, cols) from views read by hand and the model called directly."""
    views, missing, item = views_by_hand(slide_path, store, rows, cols)
    if missing_override is not None:
        missing = missing_override
    with torch.inference_mode():
        return torch.softmax(model.eval()(views, missing), 1).numpy(), item.missing


def test_one_read_per_block_and_view(counted_run):
    res, calls = counted_run
    blocks = [c[0] for c in calls]
    assert len(blocks) == len(set(blocks)) == res.blocks_total > 1  # every block read once
    for index, reads, inside_views in calls:
        # one read_region per view with an inside view: never one per tile
        assert reads == inside_views and 1 <= reads <= 2, (index, reads)
    assert sum(r for _, r, _ in calls) < res.tiles_tissue


def test_store_records_views_and_matches_the_model(slide, model_dir, counted_run):
    res, _ = counted_run
    store = HeatmapStore.open(res.store)
    assert store.attrs["views"] == VIEWS
    assert store.attrs["model"]["config"]["model_kwargs"]["views"] == VIEWS
    tiles = res.tiles()
    rows, cols = tiles["row"].to_numpy(), tiles["col"].to_numpy()
    hand, missing = _hand(slide.path, store, model_dir[1], rows, cols)
    # context leaves the 12 x 8 tile slide exactly for the outer two rows and columns
    expect = (rows < 2) | (rows > 5) | (cols < 2) | (cols > 9)
    assert np.array_equal(missing[:, 1], expect) and not missing[:, 0].any()
    assert 0 < expect.sum() < len(expect)
    np.testing.assert_allclose(store.probabilities(0)[:, rows, cols].T, hand, atol=2e-5)
    # teeth: treating the white padding as a present view would change the edge tiles' output
    present, _ = _hand(slide.path, store, model_dir[1], rows[expect], cols[expect],
                       missing_override=torch.zeros(int(expect.sum()), 2, dtype=torch.bool))
    assert np.abs(present - hand[expect]).max() > 1e-3


def test_padded_context_pixels_do_not_change_predictions(slide, model_dir, counted_run, tmp_path, monkeypatch):
    res, _ = counted_run
    # missing views filled with black instead of white: the model masks them, nothing changes
    monkeypatch.setattr(engine_views, "read_block_views", functools.partial(read_block_views, fill=0))
    black = analyze_slide(slide.path, model=model_dir[0], out=tmp_path / "black", config=CFG)
    a, b = HeatmapStore.open(res.store).probabilities(0), HeatmapStore.open(black.store).probabilities(0)
    assert np.isfinite(a).sum() == 2 * res.tiles_tissue
    np.testing.assert_array_equal(a, b)


def test_a_multiview_model_must_declare_valid_views(tmp_path):
    model = create_model("multiview", num_classes=2, backbone="timm:test_resnet", num_views=2)
    with pytest.raises(ModelConfigError, match="declares none: add model_kwargs.views"):
        resolve_model(model, MODEL_CFG)
    wrong = create_model("multiview", num_classes=2, backbone="timm:test_resnet", num_views=2,
                         views=[{"mpp": 16.0, "size": 50}, {"mpp": 4.0, "size": 50}])
    with pytest.raises(ModelConfigError, match="view 0 must be the tile"):
        resolve_model(wrong, MODEL_CFG)
    with pytest.raises(ModelConfigError, match="declares 1 view"):
        create_model("multiview", num_classes=2, backbone="timm:test_resnet", num_views=2, views=VIEWS[:1])
