"""Paper protocols: run lists, resumable execution through train(), aggregation, figures, Table 8."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from wsi_cmaf.errors import ConfigError, DataError
from wsi_cmaf.models import ABLATIONS, TAU_INITS_TABLE7
from wsi_cmaf.train.paper import protocols as P
from wsi_cmaf.train.paper.report import aggregate, markdown_table, plot_tau_entropy, write_tables

TINY_CMAF = {"spatial_backbone": "test_resnet", "mvit_stem_channels": 8, "mvit_channels": [8, 8, 16, 16, 16],
             "mvit_dims": [16, 16, 16], "mvit_depths": [1, 1, 1], "mvit_heads": 2, "context_dim": 32,
             "num_heads": 4, "bottleneck_dim": 8, "head_hidden": [16], "nystrom_landmarks": 8,
             "attention": "nystrom"}


def tiny_base() -> dict:
    """A base config that trains in a few seconds: 160 patches of 32 px, 2 steps per epoch."""
    return {
        "seed": 0, "precision": "off", "bootstrap": 20, "log_every": 1, "early_stopping_patience": None,
        "data": {"synthetic": {"n_patients": 10, "patches_per_patient": 16, "patch_size": 32, "ratio": "70:30",
                               "signal": 1.0, "seed": 3},
                 "batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 2, "augment": False},
        "model": {"name": "cmaf_net", "input_size": 32, "stain_normalization": None, "kwargs": dict(TINY_CMAF)},
        "loss": {"loss": "acbfl"},
        "optim": {"sam": False},
        "stages": {"epochs": [1, 1, 1]},
    }


# ----------------------------------------------------------------------------- run lists
def test_protocol_run_lists_cover_the_paper_tables():
    base = tiny_base()
    imb = P.build_protocol("imbalance", base, seeds=[0, 1], ratios=["70:30", "99:1"], losses=["ce", "focal"])
    assert len(imb.runs) == 2 * 2 * 2
    assert {(r.labels["ratio"], r.labels["loss"]) for r in imb.runs} == {
        (a, b) for a in ("70:30", "99:1") for b in ("cross_entropy", "focal")}
    abl = P.build_protocol("ablations", base, seeds=[0])
    assert [r.labels["ablation"] for r in abl.runs] == list(ABLATIONS) + ["acbfl_no_class_gamma", "acbfl_no_dynamic",
                                                                       "with_dfa"]
    temp = P.build_protocol("temperature", base, seeds=[0])
    assert [r.labels["tau_init"] for r in temp.runs] == list(TAU_INITS_TABLE7)
    t1 = P.build_protocol("table1", base, seeds=[0])
    models = [r.labels["model"] for r in t1.runs]
    assert models.count("cmaf_net") == 1 + len(P.LOSS_BASELINES)  # acbfl + five loss baselines
    assert {f"timm:{a}" for a in P.TIMM_BASELINES} <= set(models)
    assert len({r.name for r in t1.runs}) == len(t1.runs)  # one folder per run


def test_run_configs_apply_overrides(tmp_path):
    base = tiny_base()
    t1 = P.build_protocol("table1", base, seeds=[4])
    by_name = {r.labels["model"]: r for r in t1.runs if r.labels["loss"] == "acbfl"}
    resnet = P.run_config(base, by_name["timm:resnet50"], tmp_path / "r")
    assert resnet.model.name == "timm:resnet50" and resnet.model.kwargs == {}  # CMAF kwargs removed
    assert [s.trainable for s in resnet.stages] == ["all"] and resnet.stages[0].epochs == 3
    assert resnet.seed == 4 and resnet.output_dir == str(tmp_path / "r")
    vit = P.run_config(base, by_name["timm:vit_small_patch16_224"], tmp_path / "v")
    assert vit.model.kwargs == {"img_size": 32}
    temp = P.build_protocol("temperature", base, seeds=[0])
    cfg = P.run_config(base, temp.runs[-1], tmp_path / "t")
    assert cfg.model.kwargs["tau_init"] == TAU_INITS_TABLE7[-1]
    assert cfg.model.kwargs["context_dim"] == 32  # merged, not replaced
    abl = P.build_protocol("ablations", base, seeds=[0])
    cfgs = {r.labels["ablation"]: P.run_config(base, r, tmp_path / r.name) for r in abl.runs}
    assert cfgs["cnn_only"].model.ablation == "cnn_only" and cfgs["full"].model.ablation is None
    assert cfgs["acbfl_no_dynamic"].loss.loss == "acbfl_no_dynamic"


def test_bad_names_and_set_syntax_are_config_errors():
    with pytest.raises(ConfigError, match="unknown protocol"):
        P.build_protocol("table9", tiny_base())
    with pytest.raises(ConfigError, match="unknown loss"):
        P.build_protocol("imbalance", tiny_base(), losses=["hinge"])
    with pytest.raises(ConfigError, match="ratio"):
        P.build_protocol("imbalance", tiny_base(), ratios=["95-5"])
    for bad in (["data.batch_size"], ["=3"], ["data..x=1"], ["a=[1,"]):
        with pytest.raises(ConfigError):
            P.parse_set(bad)
    with pytest.raises(ConfigError, match="not a section"):
        P.parse_set(["seed=1", "seed.x=2"])
    assert P.parse_set(["stages.epochs=[1,2,3]", "data.batch_size=16", "model.ablation=null", "name=abc"]) == {
        "stages": {"epochs": [1, 2, 3]}, "data": {"batch_size": 16}, "model": {"ablation": None}, "name": "abc"}


def test_cli_reports_bad_protocol_and_set(tmp_path, capsys):
    from wsi_cmaf.cli import main

    assert main(["protocol", "table9", "--out", str(tmp_path)]) == 2
    assert "unknown protocol 'table9'" in capsys.readouterr().err
    assert main(["protocol", "imbalance", "--out", str(tmp_path), "--set", "oops"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["protocol", "imbalance", "--out", str(tmp_path)]) == 2
    assert "--base" in capsys.readouterr().err


# ----------------------------------------------------------------------------- aggregation
def test_aggregate_mean_std_over_seeds_from_hand_made_rows(tmp_path):
    rows = []
    values = {("70:30", "focal"): [0.6, 0.7, 0.8], ("99:1", "focal"): [0.1, 0.2, 0.6]}
    for (ratio, loss), sens in values.items():
        for seed, s in enumerate(sens):
            rows.append({"run": f"{ratio}-{seed}", "ratio": ratio, "loss": loss, "seed": seed,
                         "test_sensitivity": s, "test_sensitivity_ci_low": s - 0.1, "val_balanced_accuracy": 1 - s,
                         "best_epoch": 3})
    table = aggregate(rows, ["ratio", "loss"])
    assert list(table["ratio"]) == ["70:30", "99:1"] and list(table["n_seeds"]) == [3, 3]
    for (ratio, _), sens in values.items():
        r = table[table["ratio"] == ratio].iloc[0]
        assert math.isclose(r["test_sensitivity_mean"], np.mean(sens))
        assert math.isclose(r["test_sensitivity_std"], np.std(sens, ddof=1))
        assert math.isclose(r["val_balanced_accuracy_mean"], 1 - np.mean(sens))
    assert "test_sensitivity_ci_low_mean" not in table.columns and "best_epoch_mean" not in table.columns
    md = markdown_table(table, ["ratio", "loss"], "T")
    assert "| 70:30 | focal | 3 | 0.300 ± 0.100 | 0.700 ± 0.100 |" in md
    table2, _ = write_tables(rows[:1], ["ratio", "loss"], tmp_path)  # one seed: std undefined, shown bare
    assert math.isnan(table2["test_sensitivity_std"].iloc[0])
    assert "| 70:30 | focal | 1 | 0.400 | 0.600 |" in (tmp_path / "results.md").read_text()
    assert len(pd.read_csv(tmp_path / "results_per_seed.csv")) == 1
    with pytest.raises(DataError):
        aggregate([], ["ratio"])


def test_fig4_from_hand_made_log(tmp_path):
    from wsi_cmaf.train.engine.logging_utils import RunLogger

    log = RunLogger(tmp_path / "logs")
    for step in range(0, 40, 5):
        log.log("step", {"epoch": 1, "step": step, **{f"tau/{h}": 1.0 + 0.01 * step * h for h in range(4)},
                         **{f"attn_entropy/{h}": 2.0 - 0.02 * step for h in range(4)}, "gate_mean": 0.5})
    log.log("epoch", {"epoch": 1, "val/balanced_accuracy": 0.7})
    png = plot_tau_entropy(tmp_path / "logs", tmp_path / "fig4.png")
    assert png.stat().st_size > 5000
    bare = RunLogger(tmp_path / "bare")
    bare.log("step", {"epoch": 1, "step": 0, "total": 1.0})
    with pytest.raises(DataError, match="tau"):
        plot_tau_entropy(tmp_path / "bare" / "log.jsonl", tmp_path / "x.png")
    with pytest.raises(DataError):
        plot_tau_entropy(tmp_path / "missing", tmp_path / "y.png")


# ----------------------------------------------------------------------------- Table 8
def test_efficiency_on_tiny_models(tmp_path):
    from wsi_cmaf.train.paper.efficiency import EfficiencyConfig, run_efficiency

    cfg = EfficiencyConfig(models=["cmaf_net", "timm:resnet18"], model_kwargs={"cmaf_net": TINY_CMAF},
                           input_size=32, batch_size=2, warmup=1, iters=2)
    table, md = run_efficiency(cfg, tmp_path, progress=False)
    assert list(table["model"]) == ["cmaf_net", "timm:resnet18"]
    assert (table["params_M"] > 0).all() and (table["gflops"] > 0).all() and (table["images_per_s"] > 0).all()
    assert np.allclose(table["gmacs"] * 2, table["gflops"])
    assert table["params_M"].iloc[1] > table["params_M"].iloc[0]  # resnet18 >> the tiny CMAF-Net
    assert set(table["memory_method"]) == {"cpu_rss_peak_delta"}
    assert (table["peak_memory_MiB"] > 0).all()  # each model measured from a clean baseline
    assert "timm:resnet18" in md and (tmp_path / "results.csv").is_file()
    assert (tmp_path / "table8_efficiency.png").is_file()
    prov = json.loads((tmp_path / "results.json").read_text())["provenance"]
    assert len(prov["commit"]) == 40 and prov["device"].startswith("cpu") and prov["torch"] and prov["timm"]
    with pytest.raises(ConfigError):
        EfficiencyConfig(models=["cmaf_net"], batch_size=0).validate()


# ----------------------------------------------------------------------------- end to end
def test_protocol_trains_writes_tables_and_resumes(tmp_path, monkeypatch):
    from wsi_cmaf.train.engine.trainer import train

    calls: list[tuple[str, bool]] = []

    def counting_train(cfg, *, resume=False, progress=None):
        calls.append((cfg.name, resume))
        return train(cfg, resume=resume, progress=progress)

    base = tiny_base()
    out = tmp_path / "sweep"
    protocol = P.build_protocol("imbalance", base, seeds=[0], ratios=["70:30"], losses=["cross_entropy", "focal"])
    rows = P.run_protocol(protocol, base, out, progress=False, train_fn=counting_train)
    assert [c[1] for c in calls] == [False, False] and len(rows) == 2
    for name in ("results.csv", "results.md", "results_per_seed.csv", "fig3_imbalance.png", "protocol.json"):
        assert (out / name).is_file(), name
    prov = json.loads((out / "protocol.json").read_text())["provenance"]
    assert set(prov) >= {"commit", "dirty", "python", "torch", "timm", "numpy", "device", "command"}
    table = pd.read_csv(out / "results.csv")
    assert list(table["loss"]) == ["cross_entropy", "focal"] and set(table["n_seeds"]) == {1}
    assert table["test_sensitivity_mean"].between(0, 1).all()
    assert "| 70:30 | focal | 1 |" in (out / "results.md").read_text()
    assert len(list((out / "synthetic_data").glob("synthetic-*"))) == 1  # generated once, shared
    first = out / protocol.runs[0].name / "result.json"
    stamp = first.stat().st_mtime_ns

    # Rerun: both finished, nothing retrained, same table.
    calls.clear()
    rows2 = P.run_protocol(protocol, base, out, progress=False, train_fn=counting_train)
    assert calls == [] and first.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.DataFrame(rows2), pd.DataFrame(rows))

    # An interrupted run (checkpoints, no result.json) is resumed, not restarted.
    (out / protocol.runs[1].name / "result.json").unlink()
    rows3 = P.run_protocol(protocol, base, out, progress=False, train_fn=counting_train)
    assert calls == [(protocol.runs[1].name, True)]
    assert rows3[1]["test_balanced_accuracy"] == pytest.approx(rows[1]["test_balanced_accuracy"])
    assert json.loads((out / "protocol.json").read_text())["protocol"] == "imbalance"
