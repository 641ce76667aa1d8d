"""Table 8 settings plan, floor checks and the per-setting output (tiny models, CPU, in-process)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.paper.efficiency import EfficiencyConfig, floor_checks, run_efficiency

TINY = {"mvit_stem_channels": 8, "mvit_channels": [8, 8, 16, 16, 16], "mvit_dims": [16, 16, 16],
        "mvit_depths": [1, 1, 1], "context_dim": 32, "num_heads": 4, "bottleneck_dim": 8,
        "head_hidden": [16], "spatial_backbone": "test_resnet"}


def test_settings_per_device_and_quick_plan():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert EfficiencyConfig().settings(cpu) == [("fp32", "off", 32), ("fp32", "off", 1)]
    full = EfficiencyConfig().settings(cuda)
    assert full[0] == ("fp32", "off", 256) and len(full) == 8  # 2 precisions x 2 compile x 2 batches
    quick = EfficiencyConfig(quick=True).settings(cuda)
    assert ("bf16", "on", 256) in quick and ("bf16", "auto", 1) in quick and quick[0] == ("fp32", "off", 256)
    assert EfficiencyConfig(quick=True).resolved_models() == ["cmaf_net", "timm:resnet50"]
    with pytest.raises(ConfigError):
        EfficiencyConfig(precisions=["fp8"]).validate()
    with pytest.raises(ConfigError):
        EfficiencyConfig(compile=["fast"]).validate()


def _row(model, device, precision, comp, batch, ips, mode="eager"):
    return {"model": model, "device": device, "precision": precision, "compile": comp, "batch": batch,
            "images_per_s": ips, "compile_mode": mode}


def test_floor_checks_compare_the_same_setting():
    long = pd.DataFrame([
        _row("cmaf_net", "cpu", "fp32", "off", 32, 15.0), _row("timm:resnet50", "cpu", "fp32", "off", 32, 12.0),
        _row("cmaf_net", "cuda:0", "bf16", "on", 256, 13000.0, "default"),
        _row("timm:resnet50", "cuda:0", "bf16", "on", 256, 10000.0, "default"),
        _row("timm:resnet50", "cuda:0", "bf16", "off", 256, 99999.0),  # eager: not the compiled floor
        _row("cmaf_net", "cuda:0", "bf16", "auto", 1, 800.0, "reduce-overhead"),
        _row("cmaf_net", "cuda:0", "fp32", "off", 1, 80.0),
    ])
    floors = {f["floor"]: f for f in floor_checks(long)}
    assert floors["cpu_fp32_eager_ratio"]["value"] == pytest.approx(1.25) and not floors["cpu_fp32_eager_ratio"]["ok"]
    assert floors["gpu_bf16_compiled_b256_ratio"]["value"] == pytest.approx(1.3)
    assert floors["gpu_bf16_compiled_b256_ratio"]["ok"]
    assert floors["gpu_b1_fps"]["value"] == 800.0 and floors["gpu_b1_fps"]["compile_mode"] == "reduce-overhead"
    assert floor_checks(long[long["model"] == "cmaf_net"]) == [floors["gpu_b1_fps"]]  # no reference: no ratio


def test_run_writes_per_setting_rows_and_json(tmp_path):
    cfg = EfficiencyConfig(models=["cmaf_net"], model_kwargs={"cmaf_net": TINY}, input_size=32, batch_size=4,
                           warmup=1, iters=2, latency_iters=2, device="cpu", isolate=False)
    table, md = run_efficiency(cfg, tmp_path, progress=False)
    assert list(table["model"]) == ["cmaf_net"] and table["attention"].iloc[0] == "auto"
    assert table["fp32_eager_b4_img_s"].iloc[0] > 0 and table["fp32_eager_b1_img_s"].iloc[0] > 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [(r["batch"], r["compile_mode"]) for r in payload["rows"]] == [(4, "eager"), (1, "eager")]
    assert payload["floors"] == []  # no ResNet-50, and not the floor's batch
    assert "Throughput per setting" in md and (tmp_path / "results_long.csv").is_file()
