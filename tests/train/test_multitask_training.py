"""Training with multi-task heads (issue 17, item 3): malignancy plus a subtype head trained jointly
on a manifest where half the samples carry no subtype; the single-task path is unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_cmaf.errors import ConfigError, DataError, ManifestError
from wsi_cmaf.models import load_model
from wsi_cmaf.models.heads import saved_task_classes
from wsi_cmaf.train.config import StageConfig, TrainConfig, merge_dicts
from wsi_cmaf.train.data.datasets import build_dataloaders
from wsi_cmaf.train.data.manifest import BREAKHIS_SUBTYPE_ORDER, task_label_array
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset
from wsi_cmaf.train.engine import loop, trainer
from wsi_cmaf.train.engine.logging_utils import read_jsonl
from wsi_cmaf.train.engine.trainer import build_model, train
from wsi_cmaf.train.evaluate.checkpoint import evaluate_checkpoint

torch.set_num_threads(1)

#: The tiny CMAF-Net of tests/train/test_trainer.py (~0.4 M parameters).
TINY = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
            mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
            bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16, attention="nystrom")
TASKS = {"malignancy": 2, "subtype": 8}
SUBTYPES = {0: ["adenosis", "fibroadenoma"], 1: ["ductal_carcinoma", "lobular_carcinoma"]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """96 synthetic PNG patches of 8 patients; every other row has a subtype name, the rest none."""
    root = tmp_path_factory.mktemp("patches")
    written = write_synthetic_dataset(root, SyntheticPatchConfig(n_patients=8, patches_per_patient=12, ratio="60:40",
                                                                 signal=1.0))
    frame = pd.read_csv(written["manifest"])
    frame["subtype"] = [SUBTYPES[label][(i // 2) % 2] if i % 2 == 0 else ""
                        for i, label in enumerate(frame["label"])]
    frame.to_csv(written["manifest"], index=False)
    return written["manifest"]


def config(manifest: Path, out: Path, **override) -> dict:
    base = {"data": {"source": str(manifest), "batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 2},
            "model": {"name": "multitask", "kwargs": {"backbone_kwargs": TINY}, "input_size": 32, "tasks": TASKS},
            "loss": {"task_weights": {"subtype": 0.5}},
            "stages": {"epochs": [1, 1, 1]}, "output_dir": str(out), "bootstrap": 20, "log_every": 1,
            "progress_bar": False, "compile": "off", "device": "cpu"}
    return merge_dicts(base, override)


@pytest.fixture(scope="module")
def multitask_run(manifest, tmp_path_factory):
    """A three-stage multi-task run, with the model's tensors recorded around each stage."""
    snapshots: list[tuple[str, dict, dict]] = []
    original = trainer.run_stage

    def recording(ctx, loss_cfg, index, resume_state):
        before = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        original(ctx, loss_cfg, index, resume_state)
        snapshots.append((ctx.config.stages[index].trainable, before,
                          {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "run_stage", recording)
        result = train(TrainConfig.from_dict(config(manifest, tmp_path_factory.mktemp("run") / "mt")))
    return result, snapshots


def test_subtype_column_becomes_the_second_target(manifest):
    frame = pd.DataFrame({"subtype": ["adenosis", "", None, "4", 7, -1, float("nan")]})
    assert task_label_array(frame, "subtype", BREAKHIS_SUBTYPE_ORDER, "m").tolist() == [0, -1, -1, 4, 7, -1, -1]
    with pytest.raises(ManifestError) as exc:
        task_label_array(pd.DataFrame({"subtype": ["adenosis", "carcinoma", "9"]}), "subtype",
                         BREAKHIS_SUBTYPE_ORDER, "m")
    assert "line 3" in str(exc.value) and "line 4" in str(exc.value) and "line 2" not in str(exc.value)
    bundle = build_dataloaders(manifest, batch_size=8, return_index=True,
                               tasks={"subtype": list(BREAKHIS_SUBTYPE_ORDER)})
    x, y, idx, extra = bundle.datasets["train"][0]
    assert x.shape == (3, 50, 50) and set(extra) == {"subtype"}
    # unlabelled samples are kept: every row of the manifest is in some split
    total = sum(len(ds) for ds in bundle.datasets.values())
    assert total == 96
    labels = np.concatenate([ds.task_labels["subtype"] for ds in bundle.datasets.values()])
    assert (labels == -1).sum() == 48 and set(labels[labels >= 0].tolist()) == {0, 1, 4, 5}
    batch = next(iter(bundle.loaders["train"]))
    assert len(batch) == 4 and batch[3]["subtype"].dtype == torch.int64
    # single task: samples are (x, y, idx) exactly as before
    plain = build_dataloaders(manifest, batch_size=8, return_index=True)
    assert len(plain.datasets["train"][0]) == 3
    with pytest.raises(DataError, match="patch store"):
        store = write_synthetic_dataset(manifest.parent / "store", SyntheticPatchConfig(n_patients=3,
                                        patches_per_patient=2), formats=("zarr",))["store"]
        build_dataloaders(store, tasks={"subtype": list(BREAKHIS_SUBTYPE_ORDER)})


def test_config_errors_are_named(manifest, tmp_path):
    good = config(manifest, tmp_path / "x")
    TrainConfig.from_dict(good)
    cases = [
        (merge_dicts(good, {"model": {"name": "cmaf_net", "kwargs": TINY}}), "model.tasks needs a model"),
        (merge_dicts(good, {"model": {"tasks": {"malignancy": 3, "subtype": 8}}}), "primary task"),
        (merge_dicts(good, {"loss": {"task_weights": {"grade": 1.0}}}), "task_weights"),
        (merge_dicts(good, {"loss": {"task_weights": {"subtype": -1}}}), "task_weights"),
        (merge_dicts(good, {"model": {"task_class_names": {"subtype": ["a", "b"]}}}), "8 distinct names"),
        (merge_dicts(good, {"model": {"name": "multiview"}}), "model.tasks with 2 views"),  # multiview's default
        (merge_dicts(good, {"data": {"target": "subtype"}}), "data.target"),
    ]
    for bad, words in cases:
        with pytest.raises(ConfigError, match=words):
            TrainConfig.from_dict(bad)
    TrainConfig.from_dict(merge_dicts(good, {"model": {"name": "multiview", "kwargs": {"num_views": 1}}}))
    no_tasks = merge_dicts(good, {"model": {"tasks": None}})
    with pytest.raises(ConfigError, match="need model.tasks"):
        TrainConfig.from_dict(no_tasks)


def test_unlabelled_samples_give_exactly_zero_subtype_gradient(manifest, tmp_path):
    """One step on a fixed batch, checked against the cross-entropy gradient written out by hand."""
    cfg = TrainConfig.from_dict(config(manifest, tmp_path / "g"))
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.heads.heads["subtype"]
    with torch.no_grad():  # zero head: softmax is uniform (1/8), the loss per labelled sample is ln 8
        head.weight.zero_()
        head.bias.zero_()
    feats, sub_logits = [], []
    model.heads.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))

    def keep_logits(module, inp, out):  # returns None: the output is left as it is
        out.retain_grad()
        sub_logits.append(out)

    head.register_forward_hook(keep_logits)
    rt = SimpleNamespace(stage=StageConfig("s", 1, 1e-3, trainable="all", loss="cross_entropy"), objective=None,
                         task_weights={"subtype": 0.5})
    ctx = SimpleNamespace(model=model, heads=None)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0])
    subtype = torch.tensor([3, -1, 5, -1])
    loss, _, terms, _ = loop.batch_loss(ctx, rt, x, y, {"subtype": subtype})
    assert terms["loss/subtype"].item() == pytest.approx(math.log(8.0), abs=1e-6)
    assert terms["labelled/subtype"].item() == 2.0
    assert loss.item() == pytest.approx(terms["loss/malignancy"].item() + 0.5 * math.log(8.0), abs=1e-6)
    loss.backward()
    # unlabelled rows: exactly zero gradient on their subtype logits
    grad = sub_logits[0].grad
    assert torch.equal(grad[1], torch.zeros(8)) and torch.equal(grad[3], torch.zeros(8))
    # labelled rows: d(0.5 * mean CE)/dz_i = 0.5 * (1/8 - onehot) / 2
    for row, cls in ((0, 3), (2, 5)):
        expected = torch.full((8,), 0.5 / 8 / 2)
        expected[cls] -= 0.5 / 2
        assert torch.allclose(grad[row], expected, atol=1e-7)
    h = feats[0].detach()
    hand_w = sum(torch.outer(grad[i], h[i]) for i in (0, 2))
    assert torch.allclose(head.weight.grad, hand_w, atol=1e-7)
    # a batch with no subtype label: the subtype loss is an exact 0 and the head gets no gradient
    model.zero_grad(set_to_none=False)
    loss, _, terms, _ = loop.batch_loss(ctx, rt, x, y, {"subtype": torch.full((4,), -1)})
    loss.backward()
    assert terms["loss/subtype"].item() == 0.0
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))
    assert torch.equal(head.bias.grad, torch.zeros_like(head.bias))


def test_multitask_run_logs_per_task_losses_and_metrics(multitask_run):
    result, _ = multitask_run
    steps = read_jsonl(result.val_history_path / "log.jsonl", "step")
    fused = [r for r in steps if r["stage"] != "branches"]
    assert len(steps) == 6 and len(fused) == 4
    for row in fused:
        assert {"loss/malignancy", "loss/subtype", "labelled/subtype", "task", "kl", "grad_norm/class1"} <= set(row)
        # total = primary objective + 0.5 x subtype cross-entropy
        assert row["total"] == pytest.approx(row["loss/malignancy"] + 0.5 * row["loss/subtype"], rel=1e-5)
    epochs = read_jsonl(result.val_history_path / "log.jsonl", "epoch")
    for row in epochs[1:]:
        assert row["val/subtype/n_labelled"] == 6  # half of the 12 validation samples carry a subtype
        assert 0.0 <= row["val/subtype/balanced_accuracy"] <= 1.0 and "val/subtype/macro_f1" in row
    assert {"auprc", "balanced_accuracy"} <= set(result.best_val)  # selection stays on the primary task
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["tasks"]["primary"] == "malignancy" and metrics["tasks"]["subtype/n_labelled"] > 0
    assert set(metrics["metrics"]["auprc"]) == {"value", "ci_low", "ci_high"}


def test_stages_apply_to_the_wrapped_cmaf_backbone(multitask_run):
    _, snapshots = multitask_run
    assert [s[0] for s in snapshots] == ["branches", "fusion", "all"]
    extractor = ("backbone.spatial.", "backbone.contextual.")

    def changed(before, after, inside):
        return [k for k in before if k.startswith(extractor) == inside and not torch.equal(before[k], after[k])]

    (_, b1, a1), (_, b2, a2), (_, b3, a3) = snapshots
    assert changed(b1, a1, True) and not changed(b1, a1, False)  # branches: extractors only
    assert not changed(b2, a2, True)  # fusion: extractors frozen, weights and BatchNorm statistics
    assert any(k.startswith("heads.heads.subtype") for k in changed(b2, a2, False))
    assert changed(b3, a3, True) and changed(b3, a3, False)


def test_exported_model_reloads_with_its_tasks(multitask_run, manifest, tmp_path):
    result, _ = multitask_run
    model, cfg = load_model(result.model_dir)
    assert cfg.architecture == "multitask" and cfg.class_names == ["benign", "malignant"]
    assert saved_task_classes(cfg) == {"malignancy": ["benign", "malignant"], "subtype": list(BREAKHIS_SUBTYPE_ORDER)}
    out = model(torch.zeros(2, 3, 32, 32))
    assert list(out) == ["malignancy", "subtype"]
    assert out["malignancy"].shape == (2, 2) and out["subtype"].shape == (2, 8)
    from safetensors.torch import load_file

    best = load_file(str(result.output_dir / "checkpoints" / f"best-epoch-{result.best_epoch:04d}.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key
    # `wsi-cmaf evaluate` judges a multi-task model on its primary task
    report, _ = evaluate_checkpoint(result.model_dir, manifest, split="all", out_dir=tmp_path / "eval", n_boot=10,
                                    progress=False)
    assert report["n"] == 96 and report["target"] == "label"


def test_single_task_config_is_unchanged(manifest, tmp_path, monkeypatch):
    """Tasks unset: no multi-task code runs and the numbers are those of the code before this feature.

    The pinned values were recorded with commit fd15f83 (before multi-task training) on this manifest
    and config, on CPU with one thread: a regression pin, not a hand computation.
    """
    def boom(*args, **kwargs):
        raise AssertionError("multi-task code ran in a single-task run")

    for module in (loop, trainer):
        monkeypatch.setattr(module, "predict_tasks", boom)
    monkeypatch.setattr(loop, "add_task_losses", boom)
    cfg = config(manifest, tmp_path / "single")
    cfg["model"] = {"kwargs": TINY, "input_size": 32}  # cmaf_net, no tasks
    del cfg["loss"]
    result = train(TrainConfig.from_dict(cfg))
    saved = json.loads((result.output_dir / "train_config.json").read_text())
    assert saved["model"]["tasks"] is None and saved["loss"]["task_weights"] == {}
    pinned = [(1.2988615036010742, 0.8211111111111111, 0.5), (0.16791585087776184, 0.4922222222222221, 0.5),
              (0.2506863474845886, 0.5792424242424242, 0.34285714285714286)]
    got = [(r["train_loss"], r["val/auprc"], r["val/balanced_accuracy"]) for r in result.history]
    for a, b in zip(got, pinned):
        assert a == pytest.approx(b, rel=1e-4)
    assert result.test_metrics["metrics"]["auprc"]["value"] == pytest.approx(0.8083333333333333, rel=1e-4)
    assert "tasks" not in result.test_metrics
