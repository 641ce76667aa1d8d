"""The trainer: three stages with the right parameters frozen, logs, checkpoints, resume after a
SIGKILL, export, a timm baseline, config errors, and the ``train`` / ``evaluate`` CLIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers.train import tiny_config
from wsi_cmaf.cli import main
from wsi_cmaf.errors import ConfigError, ManifestError, OutputExistsError
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.models import load_model
from wsi_cmaf.train.config import TrainConfig, merge_dicts
from wsi_cmaf.train.engine import trainer
from wsi_cmaf.train.engine.logging_utils import read_jsonl
from wsi_cmaf.train.engine.trainer import TrainResult, train

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]

EXTRACTORS = ("spatial.", "contextual.")


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, syn_dir):
    """One full three-stage run, with the model's tensors recorded before and after each stage."""
    snapshots: list[tuple[str, dict, dict]] = []
    original = trainer.run_stage

    def recording(ctx, loss_cfg, index, resume_state):
        before = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        original(ctx, loss_cfg, index, resume_state)
        after = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        snapshots.append((ctx.config.stages[index].trainable, before, after))

    out = tmp_path_factory.mktemp("run") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "run_stage", recording)
        result = train(TrainConfig.from_dict(tiny_config(out, syn_dir)))
    return result, snapshots


def _changed(before: dict, after: dict, extractor: bool) -> list[str]:
    return [k for k in before if k.startswith(EXTRACTORS) == extractor and not torch.equal(before[k], after[k])]


def test_run_writes_checkpoints_logs_report_and_model(tiny_run):
    result, _ = tiny_run
    out = result.output_dir
    assert isinstance(result, TrainResult)
    for name in ("checkpoints/last.json", "logs/log.jsonl", "logs/step.csv", "logs/epoch.csv", "metrics.json",
                 "test_confusion.png", "train_config.json", "result.json"):
        assert (out / name).is_file(), name
    assert [(r["epoch"], r["stage"]) for r in result.history] == [(1, "branches"), (2, "fusion"), (3, "finetune")]
    assert result.best_epoch in (2, 3)  # stage 1 may not be selected (select_best: false)
    assert set(result.best_val) >= {"auprc", "balanced_accuracy"}
    metrics = result.test_metrics["metrics"]
    for name in ("sensitivity", "specificity", "balanced_accuracy", "auprc", "mcc", "f1"):
        assert set(metrics[name]) == {"value", "ci_low", "ci_high"}, name
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == result.best_epoch
    record = json.loads((out / "checkpoints" / "last.json").read_text())
    state = torch.load(out / "checkpoints" / record["dir"] / "state.pt", weights_only=True)
    assert state["counters"]["epoch"] == 3 and state["counters"]["global_step"] == 9
    assert "optimizer" in state and "scheduler" in state and "rng" in state


def test_exported_model_loads_and_says_synthetic(tiny_run):
    result, _ = tiny_run
    model, config = load_model(result.model_dir)
    assert "synthetic" in config.weights_note
    assert config.input_size == 32 and config.model_kwargs["spatial_backbone"] == "test_resnet"
    resolved = resolve_model(result.model_dir)
    assert not resolved.untrained and "synthetic" in resolved.note
    from safetensors.torch import load_file

    best = load_file(str(result.output_dir / "checkpoints" / f"best-epoch-{result.best_epoch:04d}.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_step_rows_log_every_monitoring_quantity(tiny_run):
    result, _ = tiny_run
    steps = read_jsonl(result.val_history_path / "log.jsonl", "step")
    assert len(steps) == 9
    branch = [r for r in steps if r["stage"] == "branches"]
    assert all({"loss/spatial", "loss/contextual", "total", "lr"} <= set(r) for r in branch)
    fused = [r for r in steps if r["stage"] != "branches"]
    needed = {"tau/0", "tau/1", "attn_entropy/0", "gate_mean", "grad_norm/class0", "grad_norm/class1", "task",
              "kl", "mi_st", "reg_diversity", "raw/kl", "raw/mi_st", "beta_scale", "total", "lr"}
    for row in fused:
        assert needed <= set(row), needed - set(row)
        assert row["tau/0"] > 0 and row["grad_norm/class0"] >= 0
    # stage 2 ramps the IB weights up from 0; stage 3 has them at full weight
    assert [r["beta_scale"] for r in fused if r["stage"] == "fusion"][0] == 0.0
    assert all(r["beta_scale"] == 1.0 for r in fused if r["stage"] == "finetune")
    epochs = read_jsonl(result.val_history_path / "log.jsonl", "epoch")
    assert all("val/auprc" in r and "train_loss" in r for r in epochs)


def test_stages_train_the_right_parameters(tiny_run):
    _, snapshots = tiny_run
    kinds = [s[0] for s in snapshots]
    assert kinds == ["branches", "fusion", "all"]
    (_, b1, a1), (_, b2, a2), (_, b3, a3) = snapshots
    assert _changed(b1, a1, extractor=True) and not _changed(b1, a1, extractor=False)
    assert not _changed(b2, a2, extractor=True)  # weights and BatchNorm statistics frozen
    assert any(k.startswith("cmaf.") for k in _changed(b2, a2, extractor=False))
    assert _changed(b3, a3, extractor=True) and _changed(b3, a3, extractor=False)


def test_finished_run_is_never_overwritten(tiny_run, syn_dir):
    result, _ = tiny_run
    config = TrainConfig.from_dict(tiny_config(result.output_dir, syn_dir))
    with pytest.raises(OutputExistsError, match="finished"):
        train(config)
    again = train(config, resume=True)  # nothing left to do: the stored result
    assert again.best_epoch == result.best_epoch and again.model_dir == result.model_dir


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, syn_dir):
    """A run killed mid-way and resumed gives the uninterrupted run's numbers.

    Pinned to the CPU: what is checked is that RNG states, data order and optimiser state
    continue exactly, and only CPU kernels make that visible as equal numbers: on CUDA, cuDNN's
    backward kernels and atomic adds are not bit-reproducible from run to run, killed or not.
    (On an H200 this test failed when it ran on the GPU; the check timed out before pytest
    printed why, so the device pin is the likely cause, not a proven one.)
    """
    over = {"stages": {"epochs": [2, 2, 2]}, "device": "cpu"}
    reference = train(TrainConfig.from_dict(tiny_config(tmp_path / "reference", syn_dir, **over)))
    out = tmp_path / "killed"
    cfg_path = tmp_path / "killed.json"
    cfg_path.write_text(json.dumps(tiny_config(out, syn_dir, **over)))
    code = ("import sys, torch; torch.set_num_threads(1); from wsi_cmaf.train.config import TrainConfig; "
            "from wsi_cmaf.train.engine.trainer import train; train(TrainConfig.from_file(sys.argv[1]))")
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], stdout=log, stderr=log,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                                    filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        deadline = time.monotonic() + 120
        while proc.poll() is None and not (out / "checkpoints" / "last.json").exists():
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-2000:]
    assert not (out / "result.json").exists()
    done = json.loads((out / "checkpoints" / "last.json").read_text())["epoch"]
    assert 1 <= done < 6
    config = TrainConfig.from_file(cfg_path)
    with pytest.raises(OutputExistsError, match="resume"):
        train(config)
    result = train(config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    rows = read_jsonl(out / "logs" / "log.jsonl")
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 19))
    # RNG states, data order and optimiser state continue exactly: same numbers as without a kill
    for a, b in zip(result.history, reference.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)
        assert a["val/auprc"] == pytest.approx(b["val/auprc"], rel=1e-4, abs=1e-6)


def test_timm_baseline_trains_single_stage(tmp_path, syn_dir):
    stage = {"name": "single", "epochs": 1, "lr": 1e-3, "trainable": "all", "loss": "objective",
             "dynamic_weighting": True, "schedule": "warmup_cosine", "warmup_epochs": 0.5}
    cfg = tiny_config(tmp_path / "timm", syn_dir, model={"name": "timm:resnet18", "kwargs": {}},
                      stages=[stage], optim={"sam": False})
    cfg["model"]["kwargs"] = {}
    result = train(TrainConfig.from_dict(cfg))
    assert [r["stage"] for r in result.history] == ["single"]
    steps = read_jsonl(result.val_history_path / "log.jsonl", "step")
    assert steps and all("grad_norm/class1" in r and "task" in r and "tau/0" not in r for r in steps)
    model, config = load_model(result.model_dir)
    assert config.architecture == "timm:resnet18"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_bad_configs_are_named(tmp_path, syn_dir):
    good = tiny_config(tmp_path / "x", syn_dir)
    for bad, word in ((merge_dicts(good, {"data": {"batchsize": 4}}), "batchsize"),
                      (merge_dicts(good, {"optimiser": {}}), "optimiser"),
                      (merge_dicts(good, {"stages": [{"name": "a", "epochs": 1, "lr": 1e-3, "lr_min": 0}]}),
                       "lr_min"),
                      (merge_dicts(good, {"precision": "fp8"}), "precision")):
        with pytest.raises(ConfigError, match=word):
            TrainConfig.from_dict(bad)
    # bad manifest rows: every problem listed in one error, before anything is written
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,label,patient_id,split\na.png,0,p1,train\nb.png,5,p1,test\n")
    bad_data = merge_dicts(good, {"data": {"synthetic": None, "source": str(manifest)}})
    with pytest.raises(ManifestError) as exc:
        train(TrainConfig.from_dict(bad_data))
    text = str(exc.value)
    for needle in ("line 2: image not found", "line 3: image not found", "label 5", "patient 'p1' is in 2 splits",
                   "split 'val' is empty"):
        assert needle in text, needle
    assert not [p for p in (tmp_path / "x").iterdir()]  # a fixed manifest can be retried without --resume
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(good))
    assert main(["train", "--config", str(path), "--set", "optim.sam_rh=0.1", "--no-progress"]) == 2
    assert not [p for p in (tmp_path / "x").iterdir()]


def test_cli_help():
    for verb in ("train", "evaluate"):
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0


def test_evaluate_cli_on_store_and_breakhis_style_manifest(tiny_run, syn_dir, tmp_path, capsys):
    result, _ = tiny_run
    store = next(syn_dir.glob("synthetic-*/patches.zarr"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(result.output_dir), "--manifest", str(store), "--out", str(out),
                 "--bootstrap", "20", "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == result.test_metrics["n"] and (out / "test_confusion.png").is_file()
    assert report["metrics"]["auprc"]["value"] == pytest.approx(result.test_metrics["metrics"]["auprc"]["value"])

    # a BreakHis-like manifest (PNG files, magnification and subtype columns): per-magnification blocks
    from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset

    written = write_synthetic_dataset(tmp_path / "bh", SyntheticPatchConfig(n_patients=4, patches_per_patient=6,
                                                                             ratio="50:50"))
    frame = pd.read_csv(written["manifest"])
    frame["magnification"] = [40, 100] * (len(frame) // 2)
    frame["subtype"] = frame["label"].map({0: "adenosis", 1: "ductal_carcinoma"})
    frame.to_csv(written["manifest"], index=False)
    out2 = tmp_path / "eval_bh"
    assert main(["evaluate", "--checkpoint", str(result.model_dir), "--manifest", str(written["manifest"]),
                 "--split", "all", "--out", str(out2), "--bootstrap", "10", "--no-progress"]) == 0
    report = json.loads((out2 / "metrics.json").read_text())
    assert set(report["per_magnification"]) == {"40", "100"} and report["n"] == 24
    assert set(report["per_subtype_called_positive"]) == {"adenosis", "ductal_carcinoma"}

    # bad rows: a missing image and a label outside the class set, both listed in one error
    frame.loc[0, "path"] = "nowhere/missing.png"
    frame.loc[3, "label"] = 7
    frame.to_csv(written["manifest"], index=False)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(result.model_dir), "--manifest", str(written["manifest"]),
                 "--split", "all", "--out", str(out2), "--no-progress"]) == 1  # bad rows: runtime error
    err = capsys.readouterr().err
    assert "line 2" in err and "missing.png" in err and "line 5" in err and "label 7" in err


def test_early_stopping_bf16_and_grad_checkpointing(tmp_path, syn_dir):
    """With a vanishing learning rate validation cannot improve: patience 1 ends the stage after 2 epochs."""
    stage = {"name": "fusion", "epochs": 4, "lr": 1e-12, "trainable": "fusion", "loss": "objective", "ib": "ramp",
             "schedule": "cosine"}
    cfg = tiny_config(tmp_path / "early", syn_dir, stages=[stage], precision="bf16", grad_checkpointing=True,
                      early_stopping_patience=1, optim={"sam": False})
    result = train(TrainConfig.from_dict(cfg))
    assert [(r["stage_epoch"], r["early_stop"]) for r in result.history] == [(1, False), (2, True)]
    assert result.best_epoch == 1  # AUPRC did not improve either: the first epoch stays the best
