"""``wsi_cmaf.config_dict.from_dict``: strict dataclass construction, and each config built through it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from wsi_cmaf.config_dict import check_keys, field_names, from_dict
from wsi_cmaf.errors import ConfigError, ModelConfigError


@dataclass
class _Thing:
    a: int
    c: str = "x"
    derived: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError("a must be >= 0")


def test_builds_and_names_unknown_and_valid_keys():
    assert from_dict(_Thing, {"a": 3}, where="thing") == _Thing(3, "x")
    with pytest.raises(ConfigError) as exc:
        from_dict(_Thing, {"a": 1, "z": 2, "b": 3}, where="thing")
    assert str(exc.value) == ("thing: unknown field(s) ['b', 'z']; valid fields: ['a', 'c'] "
                              "(fix the spelling or remove them)")


def test_fields_the_constructor_does_not_take_are_unknown():
    assert field_names(_Thing) == {"a", "c"}
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['derived'\]"):
        from_dict(_Thing, {"a": 1, "derived": 5}, where="thing")


def test_missing_values_bad_input_and_the_callers_error_class():
    with pytest.raises(ConfigError, match="thing: .*missing 1 required positional argument: 'a'"):
        from_dict(_Thing, None, where="thing")
    with pytest.raises(ConfigError, match="thing: expected a mapping of option -> value, got list"):
        from_dict(_Thing, [("a", 1)], where="thing")
    with pytest.raises(ModelConfigError, match="unknown field"):
        from_dict(_Thing, {"q": 1}, where="thing", error=ModelConfigError)
    with pytest.raises(ValueError, match="a must be >= 0"):  # the dataclass's own check, unchanged
        from_dict(_Thing, {"a": -1}, where="thing")
    with pytest.raises(TypeError, match="not a dataclass"):
        from_dict(dict, {}, where="thing")
    check_keys({"a": 1}, ["a"], where="thing")  # nothing unknown: no error


# ------------------------------------------------------------------ one caller per config
def test_model_and_cmaf_configs():
    from wsi_cmaf.models import CMAFConfig, ModelConfig, create_model

    with pytest.raises(ModelConfigError, match=r"model config: unknown field\(s\) \['num_clases'\].*'num_classes'"):
        ModelConfig.from_dict({"num_clases": 2})
    with pytest.raises(ModelConfigError, match=r"CMAF-Net options: unknown field\(s\) \['contxt_dim'\]"):
        CMAFConfig.from_dict({"contxt_dim": 64})
    with pytest.raises(ModelConfigError, match=r"multi-view options: unknown field\(s\) \['num_vews'\]"):
        create_model("multiview", num_vews=2)


def test_training_config_sections():
    from wsi_cmaf.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^training config: unknown field\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"data": {}, "epoch": 3})
    for section in ("data", "model", "optim"):
        with pytest.raises(ConfigError, match=rf"^training config: {section}: unknown field\(s\) \['bogus'\]"):
            TrainConfig.from_dict({"data": {}, section: {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"^training config: stages\[1\]: unknown field\(s\) \['epochz'\]"):
        TrainConfig.from_dict({"data": {}, "stages": [{"name": "a", "epochs": 1, "lr": 1e-3},
                                                      {"name": "b", "epochz": 1}]})
    with pytest.raises(ConfigError, match=r"^TrainLossConfig: unknown field\(s\) \['betaa1'\]"):
        TrainConfig.from_dict({"data": {}, "loss": {"betaa1": 0.1}})


def test_inference_config_as_a_store_records_it():
    from wsi_cmaf.infer.config import InferenceConfig

    cfg = InferenceConfig(batch_size=64, stain="none")
    assert InferenceConfig.from_dict(cfg.to_dict()) == cfg
    assert InferenceConfig.from_dict(None) == InferenceConfig()
    assert InferenceConfig.from_dict({"batch_size": 64, "stain": "none"}) == cfg
    # a key this version does not know is an error, not silently dropped
    with pytest.raises(ConfigError, match=r"inference config: unknown field\(s\) \['batchsize'\]"):
        InferenceConfig.from_dict({"batch_size": 64, "batchsize": 3})


def test_encoder_registry_entries():
    from wsi_cmaf.encoders.registry import REGISTRY_FILE, EncoderSpec

    entry = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))["encoders"][0]
    assert EncoderSpec.from_dict(entry).name == entry["name"]
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['colour'\]"):
        EncoderSpec.from_dict({**entry, "colour": "red"})
    with pytest.raises(ConfigError, match=r"embedding: unknown field\(s\) \['size'\]"):
        EncoderSpec.from_dict({**entry, "embedding": {**entry["embedding"], "size": 3}})
