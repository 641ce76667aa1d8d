"""Named errors for the small things of issue 13 §6: a malformed model config beside missing weights,
and ``out=`` pointing at an existing file (both before any slide work)."""

from __future__ import annotations

import pytest

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.errors import ModelConfigError, OutputError, WsiCmafError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide


@pytest.mark.parametrize("text", ["{not json", '{"architecture": "cmaf_net", "no_such_field": 1}', "[1, 2]"])
def test_malformed_config_beside_missing_weights_is_a_config_error(tmp_path, text):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(text)
    with pytest.raises(ModelConfigError, match="malformed model config") as exc:
        resolve_model(d)
    assert str(d / "config.json") in str(exc.value) and "weights file not found" not in str(exc.value)
    # the same through a .safetensors path that does not exist
    with pytest.raises(ModelConfigError, match="malformed model config"):
        resolve_model(d / "model.safetensors")


def test_missing_weights_beside_a_good_config_still_says_so(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    tiny_config().to_json(d / "config.json")
    with pytest.raises(WsiCmafError, match="weights file not found"):
        resolve_model(d)


def test_out_pointing_at_an_existing_file_is_a_named_error(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1600, 1200, 0.5, seed=1, save_mask=False).path
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    for out in (target, target / "sub"):
        with pytest.raises(OutputError, match="is a file") as exc:
            analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out,
                          config=InferenceConfig(progress=False))
        assert not isinstance(exc.value, FileExistsError) and str(target) in str(exc.value)
    assert target.read_text() == "not a folder"
