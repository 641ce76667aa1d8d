"""ModelConfig JSON contract and safetensors save/load."""

from __future__ import annotations

import json

import pytest
import torch

from wsi_cmaf.errors import ModelConfigError, ModelError
from wsi_cmaf.models import CMAFConfig, ModelConfig, create_model, load_model, read_config, save_model

torch.set_num_threads(2)


def test_model_config_json_roundtrip(tmp_path):
    cfg = ModelConfig(num_classes=3, class_names=["a", "b", "c"], input_size=64,
                      model_kwargs={"num_heads": 4}, weights_note="synthetic run 1")
    path = tmp_path / "config.json"
    cfg.to_json(path)
    again = ModelConfig.from_json(path)
    assert again == cfg
    assert ModelConfig.from_dict(json.loads(path.read_text())) == cfg


@pytest.mark.parametrize("bad", [
    {"num_classes": 3},  # 2 default class names
    {"class_names": ["x", "x"]},
    {"positive_class": 5},
    {"spacing_um_px": 0},
    {"input_size": 4},
    {"resize_interpolation": "lanczos9"},
    {"stain_normalization": "reinhard-ish"},
    {"std": (0.2, 0.0, 0.2)},
])
def test_model_config_rejects_bad_values(bad):
    with pytest.raises(ModelConfigError):
        ModelConfig(**bad)


def test_model_config_rejects_unknown_fields_and_bad_json(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown field"):
        ModelConfig.from_dict({"num_clases": 2})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(ModelConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "missing.json")


def test_cmaf_config_roundtrip_and_validation():
    cfg = CMAFConfig.for_ablation("single_head", bottleneck_dim=16)
    assert cfg.num_heads == 1 and cfg.bottleneck_dim == 16
    assert CMAFConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())  # JSON-ready
    assert CMAFConfig().head_dim == 60  # the paper's d_h
    with pytest.raises(ModelConfigError):
        CMAFConfig(num_heads=7)
    with pytest.raises(ModelConfigError):
        CMAFConfig(branches="neither")
    with pytest.raises(ModelConfigError):
        CMAFConfig.for_ablation("no_such_row")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("cmaf_net", num_classes=2, ablation="no_gating").eval()
    out = tmp_path_factory.mktemp("m") / "model"
    save_model(model, ModelConfig(input_size=64, weights_note="untrained test"), out)
    return model, out


def test_save_load_roundtrip_same_outputs(saved):
    model, out = saved
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded, cfg = load_model(out)
    assert cfg.model_kwargs["gating"] is False  # the architecture actually used was recorded
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    loaded2, _ = load_model(out / "model.safetensors")  # file form, config.json beside it
    assert read_config(out).input_size == 64
    with torch.no_grad():
        torch.testing.assert_close(loaded2(x), model(x))


def test_load_rejects_config_weights_mismatch(saved, tmp_path):
    _, out = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(num_classes=3, class_names=["a", "b", "c"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="fc.weight"):
        load_model(bad)
    cfg.update(num_classes=2, class_names=["a", "b"])
    cfg["model_kwargs"]["gating"] = True  # the file has no gate weights
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="missing"):
        load_model(bad)


def test_load_never_unpickles(tmp_path):
    """A pickle disguised as safetensors is refused (and its payload never runs)."""
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"fc.weight": torch.zeros(2, 2)}, d / "model.safetensors")
    ModelConfig().to_json(d / "config.json")
    with pytest.raises(ModelError, match="safetensors"):
        load_model(d)


def test_save_rejects_wrong_class_count_and_missing_files(tmp_path):
    model = create_model("cmaf_net", num_classes=2, ablation="cnn_only")
    with pytest.raises(ModelConfigError):
        save_model(model, ModelConfig(num_classes=3, class_names=["a", "b", "c"]), tmp_path / "x")
    with pytest.raises(ModelError):
        load_model(tmp_path / "nothing_here")


def test_timm_model_save_load(tmp_path):
    model = create_model("timm:resnet18", num_classes=2).eval()
    save_model(model, ModelConfig(architecture="timm:resnet18", input_size=64), tmp_path / "r18")
    loaded, cfg = load_model(tmp_path / "r18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
