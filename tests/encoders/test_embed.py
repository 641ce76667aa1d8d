"""Encoder embeddings through the engine: store vs a direct forward, resume, side by side with a
heatmap, the AnnData and TRIDENT/CLAM exports, and a folder of slides on the batch engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.helpers.encoders import random_encoder, small_spec
from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.encoders.embed import embed_slide, embed_slides, encoder_store_path, find_encoder_store, status_name
from wsi_cmaf.encoders.loader import LoadedEncoder
from wsi_cmaf.errors import OutputError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.modelspec import state_dict_sha256
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.preprocess import TilePreprocessor
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.reads import read_tile
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.slide.tissue import TissueMask
from wsi_cmaf.slidelevel import read_embeddings

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=32, compile="off", precision="off")
TILE, MPP = 28, 4.0  # 112 µm tiles: 224 level-0 px on a 0.5 µm/px slide


def _encoder(name: str, seed: int) -> LoadedEncoder:
    """A narrow Virchow2-layout (registers, SwiGLU, class ++ mean-patch) or Phikon-layout encoder."""
    spec = dataclasses.replace(small_spec(name, TILE, dim=32, depth=1), mpp=MPP, name=f"{name}-small")
    module = random_encoder(spec, seed=seed)
    return LoadedEncoder(module, spec, spec.dim, None, state_dict_sha256(module), "untrained (test)")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("enc") / "s.tiff", 4800, 3200, 0.5, seed=3)


@pytest.fixture(scope="module")
def virchow():
    return _encoder("virchow2", 0)


def _direct(slide_path, store: HeatmapStore, enc: LoadedEncoder, rows, cols) -> np.ndarray:
    """The encoder on the given tiles, read one at a time and preprocessed by hand."""
    mask, mpp = store.tissue_mask()
    with open_slide(slide_path) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=MPP, tile_size=TILE), TissueMask(mask, mpp))
        tiles = np.stack([read_tile(reader, grid, int(r), int(c)) for r, c in zip(rows, cols)])
    pre = TilePreprocessor(TILE, enc.spec.mean, enc.spec.std, enc.spec.resize)
    with torch.inference_mode():
        return enc.module.embed(pre(torch.from_numpy(tiles))).numpy()


def test_store_embeddings_match_a_direct_forward_and_resume(slide, virchow, tmp_path):
    res = embed_slide(slide.path, virchow, tmp_path, config=CFG)
    assert res.store == encoder_store_path(tmp_path, slide.path, "virchow2-small")
    assert (tmp_path / "s_virchow2-small_embed_summary.json").is_file()
    store = HeatmapStore.open(res.store)
    tiles, x = read_embeddings(store)
    assert store.embedding_dim == 64 and x.shape == (res.tiles_tissue, 64) and res.tiles_tissue > 20
    pick = np.linspace(0, len(tiles) - 1, 12).astype(int)
    want = _direct(slide.path, store, virchow, tiles.row.to_numpy()[pick], tiles.col.to_numpy()[pick])
    # stored as float16: equal up to its rounding (batching changes float32 sums in the last bits)
    np.testing.assert_allclose(x[pick], want, rtol=2e-3, atol=2e-3)
    assert not np.allclose(x[pick[0]], x[pick[-1]])  # not one constant vector
    cov = store.probabilities(0)[0]
    assert np.nanmin(cov) == np.nanmax(cov) == 1.0  # the main image is a coverage map
    assert np.isfinite(cov).sum() == len(tiles)
    again = embed_slide(slide.path, virchow, tmp_path, config=CFG)
    assert again.blocks_computed == 0 and again.blocks_skipped > 0
    np.testing.assert_array_equal(read_embeddings(again.store)[1], x)


def test_a_heatmap_and_two_encoders_share_one_slide_store(slide, virchow, tmp_path):
    phikon = _encoder("phikon", 1)
    embed_slide(slide.path, phikon, tmp_path, config=CFG)  # embeddings first: the heatmap store comes after
    heat = analyze_slide(slide.path, model=DarknessClassifier(), model_config=tiny_config(), out=tmp_path,
                         config=dataclasses.replace(CFG, overlay=False, geojson=False))
    before = HeatmapStore.open(heat.store).probabilities(0)
    embed_slide(slide.path, virchow, tmp_path, config=CFG)
    h = HeatmapStore.open(heat.store)
    np.testing.assert_array_equal(h.probabilities(0), before)
    assert h.class_names == ["benign", "malignant"] and h.embedding_dim is None
    a = HeatmapStore.open(find_encoder_store(heat.store, "phikon-small"))
    b = HeatmapStore.open(find_encoder_store(heat.store, "virchow2-small"))
    assert (a.embedding_dim, b.embedding_dim) == (32, 64)
    assert a.identity["model"] == "encoder:phikon-small" and b.identity["model"] == "encoder:virchow2-small"
    assert a.identity["weights_sha256"] != b.identity["weights_sha256"]
    with pytest.raises(OutputError, match="no embeddings of encoder 'uni'.*phikon-small"):
        find_encoder_store(heat.store, "uni")


def test_anndata_and_trident_clam_exports_reopen(slide, virchow, tmp_path):
    anndata = pytest.importorskip("anndata", reason="anndata is in the 'encoders' extra")
    h5py = pytest.importorskip("h5py", reason="h5py is in the 'encoders' extra")
    from wsi_cmaf.encoders.export import export_anndata, export_h5

    res = embed_slide(slide.path, virchow, tmp_path, config=CFG)
    tiles, x = read_embeddings(res.store)
    ad = anndata.read_h5ad(export_anndata(res.store, tmp_path / "s.h5ad"))
    assert ad.X.shape == x.shape and np.array_equal(ad.X, x)
    assert list(ad.obs["row"]) == list(tiles.row) and list(ad.obs["col"]) == list(tiles.col)
    # a tile (r, c) of 112 µm on a 0.5 µm/px slide is the level-0 box (224 c, 224 r, 224, 224)
    assert (ad.obs["x"] == 224 * ad.obs["col"]).all() and (ad.obs["y"] == 224 * ad.obs["row"]).all()
    assert (ad.obs["w"] == 224).all()
    np.testing.assert_array_equal(ad.obsm["spatial"], np.stack([224 * ad.obs["col"] + 112,
                                                                224 * ad.obs["row"] + 112], axis=1))
    assert "virchow2-small" in ad.uns["wsi_cmaf"]["encoder"]
    zarr_ad = anndata.read_zarr(export_anndata(res.store, tmp_path / "s_ad.zarr"))
    assert zarr_ad.shape == x.shape
    with h5py.File(export_h5(res.store, tmp_path / "s.h5"), "r") as f:  # as TRIDENT's / CLAM's readers do
        feats, coords, attrs = f["features"][:], f["coords"][:], dict(f["coords"].attrs)
        assert f["features"].attrs["encoder"] == "virchow2-small"
    assert feats.shape == x.shape and feats.dtype == np.float32 and coords.dtype == np.int64
    np.testing.assert_array_equal(coords, np.stack([224 * tiles.col, 224 * tiles.row], axis=1))
    assert attrs["patch_size"] == 28 and attrs["patch_size_level0"] == 224 and attrs["patch_level"] == 0
    # CLAM: size at level 0 = patch_size x downsample(level 0) x custom_downsample
    assert attrs["patch_size"] * attrs["custom_downsample"] == 224
    # TRIDENT: patch_size_level0 = patch_size x level0_magnification / target_magnification
    assert (attrs["level0_magnification"], attrs["target_magnification"]) == (20.0, 2.5)
    assert attrs["patch_size"] * attrs["level0_magnification"] // attrs["target_magnification"] == 224
    assert (attrs["level0_width"], attrs["level0_height"]) == (4800, 3200)


def test_embed_a_folder_of_slides_on_the_batch_engine_with_resume(slide, virchow, tmp_path):
    from distributed import Client

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in (1, 2):
        write_synthetic_slide(folder / f"t{i}.tiff", 2400, 1600, 0.5, seed=10 + i)
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        first = embed_slides(folder, tmp_path / "out", virchow, config=CFG, client=c, progress=False)
        assert first.counts == {"done": 2}, first.rows
        assert first.status_path.name == status_name("virchow2-small")
        stores = [r["output"] for r in first.rows]
        x1 = [read_embeddings(s)[1] for s in stores]
        again = embed_slides(folder, tmp_path / "out", virchow, config=CFG, client=c, progress=False)
    assert again.skipped == 2
    for s, x in zip(stores, x1):
        assert "/encoders/virchow2-small" in s
        np.testing.assert_array_equal(read_embeddings(s)[1], x)
