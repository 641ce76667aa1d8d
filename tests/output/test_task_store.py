"""One NGFF image group per task in the heatmap store (issue 17, item 3, last bullet)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from wsi_cmaf.errors import OutputError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.models import ModelConfig, create_model, save_model
from wsi_cmaf.output.heatmap import open_heatmap
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.tiles import tiles_geojson
from wsi_cmaf.preprocess import TilePreprocessor
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.reads import read_tile
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.slide.tissue import TissueMask

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=32, overlay=False, geojson=False,
                      compile="off", precision="off")
SUBTYPES = ["adenosis", "fibroadenoma", "phyllodes", "tubular", "ductal", "lobular", "mucinous", "papillary"]
MODEL_CFG = ModelConfig(architecture="multitask", num_classes=2, class_names=["benign", "malignant"], input_size=32,
                        stain_normalization=None, weights_note="test model (random weights, seed 0)")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("tasks") / "s.tiff", 4800, 3200, 0.5, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("multitask", num_classes=2, backbone="timm:test_resnet",
                         tasks={"malignancy": 2, "subtype": 8},
                         task_class_names={"malignancy": ["benign", "malignant"], "subtype": SUBTYPES}).eval()
    with torch.no_grad():  # a head that tells subtypes apart clearly (random init gives near-uniform rows)
        model.heads.heads["subtype"].weight.mul_(20.0)
    return save_model(model, MODEL_CFG, tmp_path_factory.mktemp("model") / "multitask"), model


@pytest.fixture(scope="module")
def result(slide, model_dir, tmp_path_factory):
    return analyze_slide(slide.path, model=model_dir[0], out=tmp_path_factory.mktemp("run"), config=CFG)


class PrimaryOnly(nn.Module):
    """The same network with only its primary head: what a single-task model would compute."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["malignancy"]


def _hand_logits(slide_path, store: HeatmapStore, model, rows, cols) -> dict[str, np.ndarray]:
    """The model's logits on the given tiles, read one by one (read_tile) and preprocessed by hand."""
    mask, mpp = store.tissue_mask()
    with open_slide(slide_path) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=50), TissueMask(mask, mpp))
        tiles = np.stack([read_tile(reader, grid, int(r), int(c)) for r, c in zip(rows, cols)])
    pre = TilePreprocessor(32, tuple(MODEL_CFG.mean), tuple(MODEL_CFG.std), "bicubic")
    with torch.inference_mode():
        out = model.eval()(pre(torch.from_numpy(tiles)))
    return {k: v.numpy() for k, v in out.items()}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_extra_task_group_layout_and_ngff(result):
    store = HeatmapStore.open(result.store)
    assert store.tasks == {"malignancy": ["benign", "malignant"], "subtype": SUBTYPES}
    assert store.extra_tasks == ["subtype"] and store.class_names == ["benign", "malignant"]
    root = zarr.open_group(str(result.store), mode="r")
    group = root["tasks/subtype"]
    main_ome, ome = root.attrs["ome"], group.attrs["ome"]
    assert [c["label"] for c in ome["omero"]["channels"]] == SUBTYPES
    assert ome["multiscales"][0]["name"] == "subtype_probabilities"
    # same pyramid levels and µm transforms as the main image, same block chunks
    assert ([d["coordinateTransformations"] for d in ome["multiscales"][0]["datasets"]]
            == [d["coordinateTransformations"] for d in main_ome["multiscales"][0]["datasets"]])
    assert len(ome["multiscales"][0]["datasets"]) == 3 and sorted(group.array_keys()) == ["0", "1", "2"]
    assert group["0"].shape == (8, *store.grid_shape) and group["0"].chunks == (8, 4, 4)
    assert root["0"].chunks == (2, 4, 4)
    # channels sum to 1 on every tissue tile, NaN elsewhere
    sub = store.probabilities(0, "subtype")
    tissue = store.tissue(0)
    np.testing.assert_allclose(sub[:, tissue].sum(axis=0), 1.0, atol=1e-5)
    assert np.isnan(sub[:, ~tissue]).all() and np.isfinite(sub[:, tissue]).all()
    # level 1 is the 2x2 NaN-mean of level 0 (one window with tissue, by hand)
    r, c = (int(v) // 2 for v in np.argwhere(tissue)[len(np.argwhere(tissue)) // 2])
    win = sub[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(8, -1)
    np.testing.assert_allclose(store.probabilities(1, "subtype")[:, r, c], np.nanmean(win, axis=1), rtol=1e-5)


def test_task_probabilities_equal_softmax_of_the_model_on_the_tiles(slide, model_dir, result):
    store = HeatmapStore.open(result.store)
    tiles = result.tiles()
    assert len(tiles) == result.tiles_tissue > 20
    pick = np.linspace(0, len(tiles) - 1, 12).astype(int)
    rows, cols = tiles["row"].to_numpy()[pick], tiles["col"].to_numpy()[pick]
    logits = _hand_logits(slide.path, store, model_dir[1], rows, cols)
    stored = store.probabilities(0, "subtype")[:, rows, cols].T
    np.testing.assert_allclose(stored, _softmax(logits["subtype"].astype(np.float64)), atol=2e-5)
    assert (stored.max(axis=1) > 0.3).all()  # not a uniform 1/8 everywhere: the comparison has teeth
    np.testing.assert_allclose(store.probabilities(0)[:, rows, cols].T,
                               _softmax(logits["malignancy"].astype(np.float64)), atol=2e-5)


def test_primary_image_is_what_a_single_task_model_stores(slide, model_dir, result, tmp_path):
    single = analyze_slide(slide.path, model=PrimaryOnly(model_dir[1]), model_config=MODEL_CFG,
                           out=tmp_path / "single", config=CFG)
    a = np.asarray(zarr.open_group(str(result.store), mode="r")["0"])
    b = np.asarray(zarr.open_group(str(single.store), mode="r")["0"])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    # the single-task store has no task groups and no tasks in its layout or summary
    meta = zarr.open_group(str(single.store), mode="r").attrs["wsi_cmaf"]
    assert meta["layout"]["tasks"] == {} and "tasks" not in zarr.open_group(str(single.store), mode="r")
    assert json.loads(single.outputs["summary"].read_text())["tasks"] == {}


def test_tile_table_open_heatmap_and_summary(result):
    tiles = result.tiles()
    sub_cols = [f"prob_subtype_{c}" for c in SUBTYPES]
    assert list(tiles.columns[-10:]) == ["prob_benign", "prob_malignant", *sub_cols]
    np.testing.assert_allclose(tiles[sub_cols].sum(axis=1), 1.0, atol=1e-5)
    store = HeatmapStore.open(result.store)
    r, c = int(tiles["row"].iloc[5]), int(tiles["col"].iloc[5])
    assert tiles["prob_subtype_lobular"].iloc[5] == pytest.approx(float(store.probabilities(0, "subtype")[5, r, c]))
    da = open_heatmap(result.store, task="subtype")
    assert da.dims == ("class", "y", "x") and list(da["class"].values) == SUBTYPES and da.attrs["task"] == "subtype"
    main = open_heatmap(result.store)
    assert np.array_equal(da["x"].values, main["x"].values) and np.array_equal(da["y"].values, main["y"].values)
    assert list(open_heatmap(result.store, task="malignancy")["class"].values) == ["benign", "malignant"]
    subtype = open_heatmap(result.store, level=2, task="subtype")
    assert subtype.shape[1:] == open_heatmap(result.store, level=2).shape[1:]
    with pytest.raises(OutputError, match="no task 'grade'.*malignancy"):
        open_heatmap(result.store, task="grade")
    # QuPath measurements carry every task
    feat = tiles_geojson(result.store)["features"][0]["properties"]["measurements"]
    assert set(sub_cols) <= set(feat)
    summary = json.loads(result.outputs["summary"].read_text())
    assert list(summary["tasks"]) == ["malignancy", "subtype"]
    assert summary["tasks"]["subtype"]["classes"] == SUBTYPES
    assert summary["tasks"]["subtype"]["store_group"] == "tasks/subtype"
    means = summary["tasks"]["subtype"]["mean_probability"]
    assert sum(means.values()) == pytest.approx(1.0, abs=1e-4)
    assert means["ductal"] == pytest.approx(float(tiles["prob_subtype_ductal"].mean()), abs=1e-5)


def test_resume_after_interruption_gives_identical_arrays(slide, model_dir, result, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = BatchRunner.submit

    def interrupted(self, tiles):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, tiles)

    monkeypatch.setattr(BatchRunner, "submit", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        analyze_slide(slide.path, model=model_dir[0], out=out, config=CFG)
    monkeypatch.undo()
    partial = HeatmapStore.open(out / "s.zarr")
    assert 0 < int(partial.done.sum()) < partial.done.size
    resumed = analyze_slide(slide.path, model=model_dir[0], out=out, config=CFG)
    assert resumed.blocks_skipped >= 2 and resumed.blocks_computed >= 1
    ref = zarr.open_group(str(result.store), mode="r")
    got = zarr.open_group(str(resumed.store), mode="r")
    for path in ("0", "1", "2", "tasks/subtype/0", "tasks/subtype/1", "tasks/subtype/2"):
        np.testing.assert_array_equal(np.asarray(ref[path]), np.asarray(got[path]), err_msg=path)


def test_store_refuses_incomplete_task_writes(tmp_path):
    store = HeatmapStore.open_or_create(
        tmp_path / "t.zarr", grid_shape=(4, 4), chunk=(2, 2), class_names=["a", "b"], identity={},
        attrs={}, um_per_tile=(100.0, 100.0), tasks={"m": ["a", "b"], "s": ["x", "y", "z"]})
    with pytest.raises(ValueError, match=r"tasks \['s'\]"):
        store.write_block((0, 0), np.zeros((2, 2, 2), np.float32))
    assert not store.done.any()  # a block without every task is never marked done
    with pytest.raises(ValueError, match="cannot name a store group"):
        HeatmapStore.open_or_create(tmp_path / "u.zarr", grid_shape=(4, 4), chunk=(2, 2), class_names=["a", "b"],
                                    identity={}, attrs={}, um_per_tile=(1.0, 1.0),
                                    tasks={"m": ["a", "b"], "s/t": ["x"]})


def test_embeddings_with_a_multitask_model_leave_every_task_unchanged(slide, model_dir, result, tmp_path):
    cfg = InferenceConfig(**{**CFG.to_dict(), "embeddings": True})
    emb = analyze_slide(slide.path, model=model_dir[0], out=tmp_path / "emb", config=cfg)
    a, b = HeatmapStore.open(result.store), HeatmapStore.open(emb.store)
    # test_resnet's pooled features (96 per tile) follow both tasks' probabilities in each output row
    assert b.embedding_dim == model_dir[1].embed_dim == 96
    np.testing.assert_allclose(b.probabilities(0, "subtype"), a.probabilities(0, "subtype"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(b.probabilities(0), a.probabilities(0), rtol=0, atol=1e-6)
    assert np.array_equal(np.isfinite(b.embeddings()).all(2), b.tissue(0))
