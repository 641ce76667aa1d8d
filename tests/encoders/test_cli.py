"""``wsi-cmaf encoders`` and ``wsi-cmaf embed`` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_cmaf.cli import main
from wsi_cmaf.slide.synthetic import write_synthetic_slide


def test_encoders_lists_every_entry_with_dim_input_mpp_and_licence(capsys):
    assert main(["encoders"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln and not ln.startswith("any timm")}
    assert len(rows) >= 10
    assert rows["virchow2"][1:4] == ["2560", "224", "px"] and rows["virchow2"][4] == "0.50"
    assert rows["phikon"][1] == "768" and "Owkin" in " ".join(rows["phikon"])
    assert main(["encoders", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {e["name"]: e["dim"] for e in entries}["prov-gigapath"] == 1536
    assert all(e["sources"] for e in entries)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("cli") / "c.tiff", 2400, 1600, 0.5, seed=4)


def test_embed_one_slide_with_a_local_timm_checkpoint_and_exports(slide, tmp_path, capsys):
    import timm

    pytest.importorskip("anndata", reason="anndata is in the 'encoders' extra")
    pytest.importorskip("h5py", reason="h5py is in the 'encoders' extra")
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    torch.save(net.state_dict(), tmp_path / "tiny.pth")
    args = ["embed", str(slide.path), "--encoder", "timm:vit_tiny_patch16_224", "--weights", str(tmp_path / "tiny.pth"),
            "--input-size", "32", "--encoder-mpp", "4", "--out", str(tmp_path / "o"), "--export", "h5ad",
            "--export", "h5", "--precision", "off"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "192-dim" in out and "tiny.pth" in out
    store = tmp_path / "o" / "c.zarr" / "encoders" / "timm_vit_tiny_patch16_224"
    assert (store / "zarr.json").is_file()
    import h5py

    with h5py.File(tmp_path / "o" / "c_timm_vit_tiny_patch16_224.h5", "r") as f:
        assert f["features"].shape[1] == 192 and f["coords"].shape == (f["features"].shape[0], 2)
        assert np.isfinite(f["features"][:]).all()
    assert (tmp_path / "o" / "c_timm_vit_tiny_patch16_224.h5ad").is_file()
    assert main(args) == 0  # resumed: nothing left to compute
    assert "0 blocks computed" in capsys.readouterr().out
    assert main([*args, "-q"]) == 0 and capsys.readouterr().out == ""


def test_embed_without_local_weights_or_with_an_unknown_encoder_fails_by_name(slide, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["embed", str(slide.path), "--encoder", "uni", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "encoder uni: no local weights" in err and "--allow-download" in err and "MahmoodLab/UNI" in err
    assert main(["embed", str(slide.path), "--encoder", "unii", "--out", str(tmp_path / "o")]) == 2
    assert "unknown encoder 'unii'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the encoder is known


def test_analyze_with_an_encoder_writes_the_heatmap_and_the_embeddings_side_by_side(slide, tmp_path, capsys,
                                                                                      monkeypatch):
    import timm

    from wsi_cmaf.output.store import HeatmapStore

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(net.state_dict(), tmp_path / "tiny224.pth")
    out = tmp_path / "o"
    assert main(["analyze", str(slide.path), "--out", str(out), "--encoder", "timm:vit_tiny_patch16_224",
                 "--encoder-weights", str(tmp_path / "tiny224.pth"), "--no-overlay", "--no-geojson"]) == 0
    assert "embeddings   timm:vit_tiny_patch16_224" in capsys.readouterr().out
    heat = HeatmapStore.open(out / "c.zarr")
    emb = HeatmapStore.open(out / "c.zarr" / "encoders" / "timm_vit_tiny_patch16_224")
    assert heat.embedding_dim is None and emb.embedding_dim == 192
    assert emb.identity["grid"]["config"]["mpp"] == 0.5 and emb.identity["grid"]["config"]["tile_size"] == 224
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["analyze", str(slide.path), "--out", str(tmp_path / "o2"), "--encoder", "uni"]) == 1
    assert "encoder uni: no local weights" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # refused before the analysis wrote anything
