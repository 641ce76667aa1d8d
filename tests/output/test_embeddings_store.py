"""Tile embeddings written by the streaming engine into the store (issue 17 item 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.errors import DataError, StoreMismatchError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.embeddings import EmbeddingsUnavailableError
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.preprocess import TilePreprocessor
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.reads import read_tile
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.slide.tissue import TissueMask
from wsi_cmaf.slidelevel import read_embeddings
from wsi_cmaf.slidelevel.synthetic_patients import TinyTileEncoder, encoder_config

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=32, overlay=False, geojson=False,
                      compile="off", precision="off")
EMB = InferenceConfig(**{**CFG.to_dict(), "embeddings": True})


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("emb") / "s.tiff", 4800, 3200, 0.5, seed=3)


@pytest.fixture(scope="module")
def encoder():
    return TinyTileEncoder(width=8)


def run(slide, out, encoder, cfg=EMB, **kw):
    return analyze_slide(slide.path, model=encoder, model_config=encoder_config(), out=out, config=cfg, **kw)


def _hand_features(slide_path, store: HeatmapStore, encoder, rows, cols) -> np.ndarray:
    """Features of the given tiles, read one by one (read_tile) and run through the model by hand."""
    mask, mpp = store.tissue_mask()
    mc = encoder_config()
    with open_slide(slide_path) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=mc.spacing_um_px, tile_size=mc.patch_size_pixels),
                                   TissueMask(mask, mpp))
        tiles = np.stack([read_tile(reader, grid, int(r), int(c)) for r, c in zip(rows, cols)])
    pre = TilePreprocessor(mc.input_size, tuple(mc.mean), tuple(mc.std), mc.resize_interpolation)
    encoder.eval()
    with torch.inference_mode():
        fmap = encoder.forward_features(pre(torch.from_numpy(tiles)))
        return encoder.forward_head(fmap, pre_logits=True).numpy()


def test_embeddings_equal_model_features_and_probs_unchanged(slide, encoder, tmp_path):
    res = run(slide, tmp_path / "e", encoder)
    plain = run(slide, tmp_path / "p", encoder, cfg=CFG)
    store = HeatmapStore.open(res.store)
    tiles, x = read_embeddings(store)
    assert store.embedding_dim == 16 and x.shape == (res.tiles_tissue, 16) and res.tiles_tissue > 10
    # every tissue tile has one, no other tile has one
    emb = store.embeddings()
    assert emb.dtype == np.float16 and emb.shape == (*store.grid_shape, 16)
    assert np.array_equal(np.isfinite(emb).all(2), store.tissue(0))
    hand = _hand_features(slide.path, store, encoder, tiles["row"], tiles["col"])
    np.testing.assert_allclose(x, hand.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    # one pass gives the same probabilities as the run without embeddings
    np.testing.assert_allclose(store.probabilities(0), HeatmapStore.open(plain.store).probabilities(0),
                               rtol=1e-6, atol=1e-7)
    # and they are the head applied to the stored features (float16 tolerance)
    with torch.no_grad():
        p = torch.softmax(encoder.fc(torch.from_numpy(hand)), 1).numpy()
    np.testing.assert_allclose(store.probabilities(0)[:, tiles["row"], tiles["col"]].T, p, atol=1e-5)
    # coordinates: tile centres in µm on the heatmap's NGFF grid (200 µm tiles)
    assert np.allclose(np.diff(np.unique(tiles["x_um"])), 200.0)


def test_off_by_default(slide, tmp_path):
    assert InferenceConfig().embeddings is False
    res = analyze_slide(slide.path, model=DarknessClassifier(), model_config=tiny_config(), out=tmp_path / "o",
                        config=CFG)
    root = zarr.open_group(str(res.store), mode="r")
    assert "embeddings" not in root and root.attrs["wsi_cmaf"]["layout"]["embedding_dim"] is None
    assert HeatmapStore.open(res.store).embeddings() is None
    with pytest.raises(DataError, match="--embeddings"):
        read_embeddings(res.store)


def test_resume_gives_the_same_array(slide, encoder, tmp_path):
    ref = run(slide, tmp_path / "ref", encoder)
    out = tmp_path / "o"
    first = run(slide, out, encoder)
    root = zarr.open_group(str(first.store), mode="r+")
    done = root["wsi_cmaf/done"]
    k0, k1 = first_chunk = HeatmapStore.open(first.store).chunk
    forgotten = np.argwhere(np.asarray(done))[-2:]
    for by, bx in forgotten:  # as if killed before these blocks: flag unset, garbage in their chunks
        done[int(by), int(bx)] = False
        root["embeddings"][by * k0:(by + 1) * k0, bx * k1:(bx + 1) * k1] = 7.0
    resumed = run(slide, out, encoder)
    assert resumed.blocks_computed == 2 and first_chunk == (4, 4)
    a = np.asarray(zarr.open_group(str(ref.store), mode="r")["embeddings"])
    b = np.asarray(zarr.open_group(str(resumed.store), mode="r")["embeddings"])
    np.testing.assert_array_equal(a, b)  # NaN positions included
    # a store is never continued with a different embeddings setting
    with pytest.raises(StoreMismatchError, match="embedding_dim"):
        run(slide, out, encoder, cfg=CFG)


def test_models_without_forward_features_get_a_named_error(slide, tmp_path):
    for model in (DarknessClassifier(), torch.jit.trace(DarknessClassifier(), torch.zeros(1, 3, 32, 32))):
        with pytest.raises(EmbeddingsUnavailableError, match="registry model"):
            analyze_slide(slide.path, model=model, model_config=tiny_config(), out=tmp_path / "x", config=EMB)
    assert not (tmp_path / "x").exists()  # refused before any output


def test_embeddings_keyword_overrides_config(slide, encoder, tmp_path):
    res = analyze_slide(slide.path, model=encoder, model_config=encoder_config(), out=tmp_path / "k",
                        config=CFG, embeddings=True)
    assert HeatmapStore.open(res.store).embedding_dim == 16
