"""``wsi-cmaf explain``: tile choice, JSON, store group, gallery, generic-only models, named errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cli import main
from wsi_cmaf.errors import StoreMismatchError, UsageError
from wsi_cmaf.explain import ExplainError, choose_tiles, integrated_gradients, occlusion
from wsi_cmaf.explain.report import explain_store
from wsi_cmaf.explain.slide import ExplainSettings, UnfinishedStoreError
from wsi_cmaf.explain.store_maps import read_explanation_group
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.models import ModelConfig, create_model
from wsi_cmaf.models.io import save_model
from wsi_cmaf.output.heatmap import open_heatmap
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.tiles import tile_table
from wsi_cmaf.slide.synthetic import write_synthetic_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import explain_sanity  # noqa: E402

CFG = InferenceConfig(device="cpu", batch_size=64, progress=False, overlay=False, geojson=False, compile="off")
# the gallery's layout constants, written out: 200 px panels, 24 px row labels, 130 px header
CELL, LABEL, HEADER = 200, 24, 130


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain_slide")
    return write_synthetic_slide(d / "s.tiff", 3200, 2400, 0.5, seed=3, tumour=True).path


@pytest.fixture(scope="module")
def dark(slide, tmp_path_factory):
    """A non-CMAF model as a TorchScript file with its JSON config, and its finished store."""
    d = tmp_path_factory.mktemp("dark")
    model = torch.jit.trace(DarknessClassifier().eval(), torch.zeros(1, 3, 32, 32))
    model.save(str(d / "dark.pt"))
    tiny_config().to_json(d / "dark.json")
    analyze_slide(slide, model=d / "dark.pt", out=d / "out", config=CFG)
    return d / "dark.pt", d / "out" / "s.zarr"


@pytest.fixture(scope="module")
def cmaf(slide, tmp_path_factory):
    """A tiny CMAF-Net saved as weights + config, and its finished store."""
    d = tmp_path_factory.mktemp("cmaf")
    torch.manual_seed(0)
    net = create_model("cmaf_net", num_classes=2, input_size=32, **explain_sanity.TINY_CMAF).eval()
    cfg = ModelConfig(architecture="cmaf_net", num_classes=2, class_names=["benign", "malignant"], input_size=32,
                      stain_normalization=None, weights_note="test model (random weights, seed 0)")
    save_model(net, cfg, d / "model")
    analyze_slide(slide, model=d / "model", out=d / "out", config=CFG)
    store = d / "out" / "s.zarr"
    # A random tiny net puts every tile near one value; a threshold at the median (recorded as the
    # analysis's decision threshold) makes the near-threshold choice differ from the default 0.5's.
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["wsi_cmaf"]["inference"]["decision_threshold"] = median_probability(store)
    (store / "zarr.json").write_text(json.dumps(doc))
    return d / "model", store


def median_probability(store: Path) -> float:
    p = HeatmapStore.open(store).probabilities(0)[1]
    return float(np.nanmedian(p))


def expected_tiles(store_path: Path, k: int, thr: float) -> tuple[list, list]:
    """The tiles the verb must pick, worked out with plain Python sorting."""
    store = HeatmapStore.open(store_path)
    p, tissue = store.probabilities(0)[1], store.tissue(0)
    cells = [(float(p[r, c]), r, c) for r in range(p.shape[0]) for c in range(p.shape[1])
             if tissue[r, c] and np.isfinite(p[r, c])]
    top = sorted(cells, key=lambda t: (-t[0], t[1], t[2]))[:k]
    rest = [t for t in cells if t not in top]
    near = sorted(rest, key=lambda t: (abs(t[0] - thr), t[1], t[2]))[:k]
    return [(r, c) for _, r, c in top], [(r, c) for _, r, c in near]


def run_cli(*args) -> int:
    return main(["-q", "explain", *map(str, args)])


def test_choose_tiles_by_hand():
    prob = np.array([[0.9, 0.2, np.nan], [0.45, 0.9, 0.55], [0.1, 0.7, 0.52]])
    tissue = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1]], bool)  # (2, 0) is not tissue
    ch = choose_tiles(prob, tissue, 2, 0.5)
    # top-2: the two 0.9 tiles, row-major on the tie; then |p - 0.5|: 0.52 (0.02), 0.45 / 0.55 (0.05)
    assert list(zip(ch.rows, ch.cols)) == [(0, 0), (1, 1), (2, 2), (1, 0)]
    assert ch.reason == ("top_k", "top_k", "near_threshold", "near_threshold")
    np.testing.assert_allclose(ch.probability, [0.9, 0.9, 0.52, 0.45])
    assert len(choose_tiles(prob, tissue, 10, 0.5)) == 7  # every candidate once, no more
    with pytest.raises(UsageError):
        choose_tiles(prob, tissue, 0, 0.5)


def test_noise_tunnel_generic_methods():
    m = explain_sanity.tiny_cnn().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = integrated_gradients(m, x, 1, n_steps=4)
    # zero noise: every noisy copy is the input itself, so SmoothGrad must equal plain IG
    np.testing.assert_allclose(integrated_gradients(m, x, 1, n_steps=4, nt_samples=3, nt_stdev=0.0), plain,
                               atol=1e-6)
    smooth = integrated_gradients(m, x, 1, n_steps=4, nt_samples=3, nt_stdev=0.3)
    assert smooth.shape == (2, 16, 16) and not np.allclose(smooth, plain)
    assert occlusion(m, x, 1, window=8, stride=8, nt_samples=2).shape == (2, 16, 16)
    with pytest.raises(ExplainError):
        integrated_gradients(m, x, 1, nt_samples=2, nt_type="nope")


def test_cmaf_store_explained(cmaf, slide, tmp_path):
    model, store = cmaf
    before = HeatmapStore.open(store).probabilities(0)
    out = tmp_path / "ex"
    assert run_cli(store, "--slide", slide, "--model", model, "--top-k", 2, "--steps", 4, "--out", out,
                   "--method", "ig", "--method", "gradcam") == 0
    thr = median_probability(store)
    top, near = expected_tiles(store, 2, thr)  # the store's decision threshold, not the default 0.5
    assert near != expected_tiles(store, 2, 0.5)[1]  # (so this test tells the two apart)
    doc = json.loads((out / "s_explain.json").read_text())
    assert [(t["row"], t["col"]) for t in doc["tiles"]] == top + near
    assert [t["reason"] for t in doc["tiles"]] == ["top_k"] * 2 + ["near_threshold"] * 2
    assert doc["decision_threshold"] == thr and doc["maps"]["cmaf"] is True and len(doc["tau"]) == 2
    assert doc["provenance"]["model"]["weights_sha256"] == HeatmapStore.open(store).identity["weights_sha256"]
    for t in doc["tiles"]:
        # tile (r, c) of 50 px at 4 µm/px on a 0.5 µm/px slide starts at 400 * (c, r) level-0 px
        assert (t["x"], t["y"], t["w"], t["h"]) == (400 * t["col"], 400 * t["row"], 400, 400)
        assert abs(t["probability"] - t["probability_recomputed"]) < 1e-3  # same pixels, same model
        assert {"ig", "gradcam", "attention_peak_yx", "gate_mean"} <= set(t["saliency"]) | set(t)
    # store group: NGFF image stacks (tile, y, x) of 4 tiles at the 32 px model input, 200 µm / 32 px
    group = zarr.open_group(str(store / "explanations" / "ig"), mode="r")
    for kind in ("saliency", "attention", "gate"):
        ome = group[kind].attrs["ome"]
        ms = ome["multiscales"][0]
        assert ome["version"] == "0.5" and [a["name"] for a in ms["axes"]] == ["tile", "y", "x"]
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 6.25, 6.25]
        assert group[f"{kind}/0"].shape == (4, 32, 32)
    placed = read_explanation_group(store, "ig")  # map pixel (0, 0) of tile (r, c): 200 µm * (r, c) + 3.125
    np.testing.assert_allclose(placed["translate_um"], [[200 * r + 3.125, 200 * c + 3.125] for r, c in top + near])
    table = np.asarray(group["tiles"][...])
    assert [tuple(r) for r in table[:, :2]] == top + near and list(table[:, 6]) == [0, 0, 1, 1]
    # the store is still whole: readers open it and its heatmap is untouched
    again = HeatmapStore.open(store)
    np.testing.assert_array_equal(again.probabilities(0), before)
    assert open_heatmap(store).shape[0] == 2 and len(tile_table(store)) > 0
    # tile, IG, Grad-CAM, attention, gate: five columns of four rows
    assert Image.open(out / "s_explain.png").size == (5 * CELL, HEADER + 4 * (LABEL + CELL))


def test_rewriting_one_map_keeps_the_others(cmaf, slide, tmp_path):
    model, store = cmaf
    if not (store / "explanations" / "ig").is_dir():  # run alone: make the first group now
        assert run_cli(store, "--slide", slide, "--model", model, "--top-k", 2, "--steps", 2, "--out", tmp_path) == 0
    ig = zarr.open_group(str(store / "explanations" / "ig"), mode="r")["saliency/0"][...]
    assert run_cli(store, "--slide", slide, "--model", model, "--top-k", 1, "--method", "gradcam",
                   "--out", tmp_path) == 0
    root = zarr.open_group(str(store / "explanations"), mode="r")
    assert root["gradcam/saliency/0"].shape == (2, 32, 32)  # replaced: 1 + 1 tiles now
    np.testing.assert_array_equal(root["ig/saliency/0"][...], ig)  # the other map is untouched
    assert root.attrs["wsi_cmaf"]["maps"] == sorted(root.group_keys()) and "ig" in root.attrs["wsi_cmaf"]["maps"]
    assert not list(store.parent.glob(".s.zarr.explain-tmp-*"))  # no temporary folder left behind


def test_non_cmaf_model_gets_generic_maps_only(dark, slide, tmp_path):
    model, store = dark
    thr = median_probability(store)  # given explicitly: overrides the store's 0.5
    assert expected_tiles(store, 2, thr)[1] != expected_tiles(store, 2, 0.5)[1]
    expl, paths = explain_store(store, slide, model, out=tmp_path, top_k=2, threshold=thr,
                                settings=ExplainSettings(methods=("ig", "occlusion"), steps=4, nt_samples=2))
    assert expl.attention is None and expl.gate is None and "only for CMAF-Net" in expl.cmaf_note
    assert set(expl.saliency) == {"ig_smoothgrad", "occlusion_smoothgrad"}
    doc = json.loads(paths["json"].read_text())
    assert doc["maps"]["cmaf"] is False and doc["tau"] is None and "generic" in doc["note"]
    assert all("gate_mean" not in t for t in doc["tiles"])
    top, near = expected_tiles(store, 2, thr)
    assert [(t["row"], t["col"]) for t in doc["tiles"]] == top + near and doc["decision_threshold"] == thr
    group = zarr.open_group(str(store / "explanations" / "ig_smoothgrad"), mode="r")
    assert set(group.group_keys()) == {"saliency"}
    # tile, IG, occlusion: three columns
    assert Image.open(paths["gallery"]).size == (3 * CELL, HEADER + 4 * (LABEL + CELL))


def test_bad_inputs_give_named_errors(dark, cmaf, slide, tmp_path, capsys):
    model, store = dark
    assert run_cli(store, "--slide", slide, "--model", model, "--top-k", 0) == 2
    assert "--top-k" in capsys.readouterr().err
    assert run_cli(store, "--slide", slide, "--model", model, "--method", "gradcam") == 2  # not a CMAF-Net
    other = write_synthetic_slide(tmp_path / "other.tiff", 3200, 2400, 0.5, seed=9, tumour=True).path
    with pytest.raises(StoreMismatchError, match="is not the slide"):
        explain_store(store, other, model, out=tmp_path, top_k=1)
    with pytest.raises(StoreMismatchError, match="another model"):
        explain_store(store, slide, cmaf[0], out=tmp_path, top_k=1)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["wsi_cmaf"]["finalized"] = False  # as an interrupted analysis leaves it
    (copy / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(UnfinishedStoreError, match="not finished"):
        explain_store(copy, slide, model, out=tmp_path, top_k=1)
    assert run_cli(copy, "--slide", slide, "--model", model) == 1


def test_real_slide(real_slides_dir, tmp_path):
    path = real_slides_dir / "cmu_small_region.svs"
    if not path.is_file():
        pytest.skip(f"real slide {path} is missing")
    d = tmp_path / "m"
    d.mkdir()
    torch.jit.trace(DarknessClassifier().eval(), torch.zeros(1, 3, 32, 32)).save(str(d / "dark.pt"))
    tiny_config().to_json(d / "dark.json")
    analyze_slide(path, model=d / "dark.pt", out=tmp_path / "out", config=CFG)
    store = tmp_path / "out" / "cmu_small_region.zarr"
    assert run_cli(store, "--slide", path, "--model", d / "dark.pt", "--top-k", 2, "--steps", 4,
                   "--out", tmp_path / "ex") == 0
    doc = json.loads((tmp_path / "ex" / "cmu_small_region_explain.json").read_text())
    top, near = expected_tiles(store, 2, 0.5)
    assert [(t["row"], t["col"]) for t in doc["tiles"]] == top + near
    assert all(abs(t["probability"] - t["probability_recomputed"]) < 1e-3 for t in doc["tiles"])
