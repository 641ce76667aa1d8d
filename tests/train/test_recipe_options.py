"""Recipe options: no ``beta_warmup_steps``, McNemar in evaluate, history clipping, stain transfer."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from wsi_cmaf.errors import ConfigError as ConfigError_
from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models.config import CMAFConfig


# ----------------------------------------------------------------------------- beta_warmup_steps
def test_beta_warmup_steps_is_not_an_option() -> None:
    """The β ramp spans stage 2, so there is no warm-up length: a config naming one is refused."""
    assert "beta_warmup_steps" not in {f.name for f in dataclasses.fields(CMAFConfig)}
    assert "beta_warmup_steps" not in CMAFConfig().to_dict()
    with pytest.raises(ModelConfigError, match="beta_warmup_steps"):
        CMAFConfig.from_dict({**CMAFConfig().to_dict(), "beta_warmup_steps": 1000})
    with pytest.raises(ModelConfigError, match="beta_warmup_stepz"):  # typos fail loudly too
        CMAFConfig.from_dict({"beta_warmup_stepz": 10})


def test_shipped_default_config_loads_without_notes(caplog: pytest.LogCaptureFixture) -> None:
    """The committed default weights' config.json builds, names every field, and logs nothing."""
    from pathlib import Path

    import wsi_cmaf.models as models

    path = Path(models.__file__).parent / "weights" / "default" / "config.json"
    kwargs = json.loads(path.read_text())["model_kwargs"]
    assert "beta_warmup_steps" not in kwargs
    with caplog.at_level(logging.DEBUG, logger="wsi_cmaf.models"):
        cfg = CMAFConfig.from_dict(kwargs)
    assert not caplog.records
    assert cfg.to_dict() == kwargs  # the file is the config's own serialisation


# ----------------------------------------------------------------------------- McNemar + seeds
def test_mcnemar_counts_and_exact_p_by_hand() -> None:
    """Discordant pairs b=6 (A right only), c=1: exact two-sided p = 2·P(X<=1 | n=7) = 16/128."""
    import numpy as np

    from wsi_cmaf.train.evaluate.metrics import mcnemar_test

    y = np.array([1] * 10 + [0] * 10)
    a = y.copy()
    b = y.copy()
    b[:6] = 0  # B wrong on 6 positives that A gets right
    a[10] = 1  # A wrong on one negative that B gets right
    a[11] = b[11] = 1  # both wrong once
    out = mcnemar_test(y, a, b)
    assert (out["a_only_correct"], out["b_only_correct"], out["both_wrong"], out["both_correct"]) == (6, 1, 1, 12)
    assert out["p_value"] == pytest.approx(16 / 128, abs=1e-12)
    # swapping the models swaps the counts, not the p-value; identical models give p = 1
    swapped = mcnemar_test(y, b, a)
    assert (swapped["a_only_correct"], swapped["b_only_correct"]) == (1, 6)
    assert swapped["p_value"] == pytest.approx(out["p_value"])
    assert mcnemar_test(y, a, a)["p_value"] == 1.0


def test_mcnemar_rejects_mismatched_lengths() -> None:
    from wsi_cmaf.errors import DataError
    from wsi_cmaf.train.evaluate.metrics import mcnemar_test

    with pytest.raises(DataError, match="pred_b"):
        mcnemar_test([0, 1, 1], [0, 1, 1], [0, 1])


def test_protocol_default_is_five_seeds() -> None:
    """The paper reports five runs with different random seeds."""
    from wsi_cmaf.train.paper import protocols as P

    assert P.DEFAULT_SEEDS == (0, 1, 2, 3, 4)


TINY = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
            mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
            bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16, attention="nystrom")


def _saved_tiny(directory, seed: int, bias: float = 0.0):
    """A tiny untrained CMAF-Net saved as an exported model (``bias`` shifts the positive logit)."""
    import torch

    from wsi_cmaf.models import ModelConfig, create_model, save_model

    torch.manual_seed(seed)
    model = create_model("cmaf_net", num_classes=2, **TINY)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[1] += bias
    cfg = ModelConfig(architecture="cmaf_net", num_classes=2, class_names=["benign", "malignant"],
                      input_size=32, stain_normalization=None, weights_note="untrained test model")
    return save_model(model.eval(), cfg, directory)


def test_evaluate_compare_reports_mcnemar(tmp_path, capsys) -> None:
    """`evaluate --compare` pairs the two models' predictions row by row and reports the exact test."""
    import numpy as np
    import pandas as pd

    from wsi_cmaf.cli import main
    from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset
    from wsi_cmaf.train.evaluate.metrics import mcnemar_test

    written = write_synthetic_dataset(tmp_path / "syn", SyntheticPatchConfig(n_patients=4, patches_per_patient=6,
                                                                              ratio="50:50"))
    a = _saved_tiny(tmp_path / "a", 0, bias=+20.0)  # calls everything malignant
    b = _saved_tiny(tmp_path / "b", 1, bias=-20.0)  # calls everything benign
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(a), "--manifest", str(written["manifest"]), "--split", "all",
                 "--out", str(out), "--bootstrap", "5", "--check-images", "exists", "--no-progress",
                 "--compare", str(b)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    m = report["mcnemar"]
    y = pd.read_csv(written["manifest"])["label"].to_numpy()
    expected = mcnemar_test(y, np.ones_like(y), np.zeros_like(y))
    assert (m["a_only_correct"], m["b_only_correct"]) == (int(y.sum()), int((1 - y).sum()))
    assert m["p_value"] == pytest.approx(expected["p_value"]) and m["n"] == len(y) == 24
    assert "McNemar" in capsys.readouterr().out


    # a model with another class set cannot be paired
    from wsi_cmaf.errors import ConfigError
    from wsi_cmaf.models import ModelConfig, create_model, save_model
    from wsi_cmaf.train.evaluate.checkpoint import evaluate_checkpoint

    other = save_model(create_model("cmaf_net", num_classes=2, **TINY).eval(),
                       ModelConfig(architecture="cmaf_net", num_classes=2, class_names=["normal", "tumour"],
                                   input_size=32, stain_normalization=None, weights_note="untrained"),
                       tmp_path / "c")
    with pytest.raises(ConfigError, match="differ"):
        evaluate_checkpoint(a, written["manifest"], split="all", out_dir=tmp_path / "e2", n_boot=2,
                            progress=False, compare=other)


# ----------------------------------------------------------------------------- history clipping
def _one_param(grad_norm: float):
    import torch

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), grad_norm / 2.0)  # ||g|| = grad_norm
    return p


def test_history_clip_follows_the_median_of_recent_norms() -> None:
    """window 3, 2x: a spike is cut to 2x the median; a sustained rise becomes the new normal."""
    import torch

    from wsi_cmaf.train.engine.clipping import HistoryGradClip

    p = _one_param(1.0)
    clip = HistoryGradClip([p], window=3, multiplier=2.0)
    seen = []
    for norm in (50.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0):
        p.grad = torch.full((4,), norm / 2.0)
        clip()
        seen.append(round(float(p.grad.norm()), 5))
    # first call: no history, no clip; 1,1,1 -> 50 drops out of the window's median
    # history before the 10s: [1,1,1] -> clip to 2; then [10,1,1] -> 2; then [10,10,1] -> median 10, kept
    assert seen == [50.0, 1.0, 1.0, 1.0, 2.0, 2.0, 10.0]
    assert float(clip.last_norm) == pytest.approx(10.0)  # the unclipped norm is what is recorded


def test_history_clip_ignores_nonfinite_norms_and_round_trips_state() -> None:
    import torch

    from wsi_cmaf.train.engine.clipping import HistoryGradClip

    p = _one_param(1.0)
    clip = HistoryGradClip([p], window=4, multiplier=2.0)
    clip()
    p.grad = torch.full((4,), float("inf"))
    clip()  # an AMP overflow step: not recorded
    assert torch.isnan(clip.history).sum() == 3 and float(torch.nanmedian(clip.history)) == 1.0
    state = clip.state_dict()
    fresh = HistoryGradClip([p], window=4, multiplier=2.0)
    fresh.load_state_dict(state)
    p.grad = torch.full((4,), 5.0)  # norm 10 -> 2 x median 1
    fresh()
    assert float(p.grad.norm()) == pytest.approx(2.0)
    with pytest.raises(ConfigError_, match="window"):
        HistoryGradClip([p], window=3).load_state_dict(state)


def test_history_clip_never_reads_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item()/float()/bool() on a tensor inside a call: the training loop stays sync-free."""
    import torch

    from wsi_cmaf.train.engine.clipping import HistoryGradClip

    params = [_one_param(1.0), _one_param(3.0)]
    clip = HistoryGradClip(params, window=5)
    clip()  # first call allocates the buffer

    def forbidden(*_a, **_k):
        raise AssertionError("host sync inside HistoryGradClip")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(3):
        clip()
    monkeypatch.undo()
    assert clip.calls == 4


def test_clip_mode_in_optim_config() -> None:
    import torch

    from wsi_cmaf.train.config import OptimConfig
    from wsi_cmaf.train.engine.clipping import AdaptiveGradClip, HistoryGradClip, build_clipper

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert OptimConfig().clip == "agc"  # the default is unchanged
    assert isinstance(build_clipper(OptimConfig(), model, None), AdaptiveGradClip)
    hist = build_clipper(OptimConfig(clip="history", clip_history_window=7, clip_history_multiplier=3.0), model, None)
    assert isinstance(hist, HistoryGradClip) and (hist.window, hist.multiplier) == (7, 3.0)
    assert len(hist.params) == 4  # global norm: the classifier too
    assert build_clipper(OptimConfig(clip="none"), model, None) is None
    assert build_clipper(OptimConfig(agc_clip_factor=None), model, None) is None
    with pytest.raises(ConfigError_, match="optim.clip"):
        OptimConfig(clip="norm")
    with pytest.raises(ConfigError_, match="window"):
        OptimConfig(clip="history", clip_history_window=0)


def test_training_with_history_clipping_checkpoints_its_history(tmp_path) -> None:
    """A short run with ``optim.clip: history`` trains, and its checkpoint carries the norm history."""
    import torch

    from tests.helpers.train import tiny_config
    from wsi_cmaf.train.config import TrainConfig
    from wsi_cmaf.train.engine.trainer import train

    cfg = tiny_config(tmp_path / "run", tmp_path / "syn", stages={"epochs": [1, 1, 0]},
                      optim={"clip": "history", "clip_history_window": 4, "sam": False})
    result = train(TrainConfig.from_dict(cfg))
    states = sorted((result.output_dir / "checkpoints").rglob("*.pt"))
    assert states, "no checkpoint state written"
    state = torch.load(states[-1], weights_only=True)
    assert state["clipper"]["calls"] > 0 and state["clipper"]["history"].shape == (4,)


# ----------------------------------------------------------------------------- stain transfer
def _stain(h: tuple[float, float, float], e: tuple[float, float, float], max_c: tuple[float, float]):
    import numpy as np

    from wsi_cmaf.stain import StainFit

    m = np.stack([np.asarray(h) / np.linalg.norm(h), np.asarray(e) / np.linalg.norm(e)], axis=1)
    return StainFit(m.astype(np.float32), np.asarray(max_c, np.float32), 100)


def test_stain_transfer_matches_macenko_from_the_reference_onto_the_drawn_stain() -> None:
    """p = 1, one reference R: the batch (in the normalisation reference stain) is re-rendered in R
    exactly as MacenkoNormalizer(reference=R) with the reference as its source would."""
    import torch

    from wsi_cmaf.stain import MacenkoNormalizer, reference_fit
    from wsi_cmaf.train.data.augment import AugmentConfig, BatchAugment

    target = _stain((0.50, 0.80, 0.35), (0.15, 0.90, 0.40), (1.4, 0.7))
    aug = BatchAugment(AugmentConfig(stain_transfer_p=1.0), seed=3).set_stain_references(reference_fit(), [target])
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 200 + 30
    expected = MacenkoNormalizer(target).set_source(reference_fit())(x)
    torch.testing.assert_close(aug.stain_transfer(x.clone()), expected, rtol=1e-4, atol=1e-3)
    assert (aug.stain_transfer(x.clone()) - x).abs().mean() > 5  # a real change of colour


def test_stain_transfer_probability_references_and_seed() -> None:
    import torch

    from wsi_cmaf.stain import reference_fit
    from wsi_cmaf.train.data.augment import AugmentConfig, BatchAugment

    refs = [_stain((0.5, 0.8, 0.35), (0.15, 0.9, 0.4), (1.4, 0.7)),
            _stain((0.7, 0.6, 0.4), (0.1, 0.95, 0.3), (2.0, 1.0))]
    x = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 200 + 30

    def run(seed: int) -> torch.Tensor:
        aug = BatchAugment(AugmentConfig(stain_transfer_p=0.5), seed=seed).set_stain_references(reference_fit(), refs)
        return aug.stain_transfer(x.clone())

    a = run(7)
    unchanged = (a == x).flatten(1).all(1)
    assert 16 < int(unchanged.sum()) < 48  # about half the samples keep their stain
    torch.testing.assert_close(a, run(7))  # seeded
    assert not torch.equal(a, run(8))
    # off by default, and a no-op without references
    assert AugmentConfig().stain_transfer_p == 0.0
    assert torch.equal(BatchAugment(AugmentConfig(stain_transfer_p=1.0)).stain_transfer(x), x)
    with pytest.raises(ConfigError_, match="stain_transfer_p"):
        AugmentConfig(stain_transfer_p=1.5)


def test_stain_transfer_needs_macenko_normalisation(tmp_path) -> None:
    import torch

    from wsi_cmaf.train.config import DataConfig, ModelSection
    from wsi_cmaf.train.data.datasets import DataBundle
    from wsi_cmaf.train.data.setup import build_pipeline

    data = DataConfig(augment_kwargs={"stain_transfer_p": 0.5})
    model = ModelSection(stain_normalization=None)
    with pytest.raises(ConfigError_, match="stain_normalization"):
        build_pipeline(data, model, DataBundle({}, {}, {}), 0, torch.device("cpu"))


class _Interrupt(RuntimeError):
    """Raised by the test to stop a run after its first checkpoint."""


def test_resumed_run_continues_the_clip_history(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after epoch 1 and resumed, a history-clipped run gives the uninterrupted numbers
    (a fresh, empty history would leave the first resumed step unclipped)."""
    from tests.helpers.train import tiny_config
    from wsi_cmaf.train.config import TrainConfig
    from wsi_cmaf.train.engine import trainer
    from wsi_cmaf.train.engine.trainer import train

    stage = {"name": "fusion", "epochs": 2, "lr": 1e-3, "trainable": "fusion", "loss": "objective", "ib": "ramp",
             "schedule": "cosine"}
    over = {"stages": [stage], "device": "cpu",
            "optim": {"clip": "history", "clip_history_window": 8, "clip_history_multiplier": 1.01, "sam": False}}
    syn = tmp_path / "syn"
    reference = train(TrainConfig.from_dict(tiny_config(tmp_path / "ref", syn, **over)))

    original, calls = trainer.train_epoch, []

    def stop_second(ctx, rt, epoch, stage_epoch):
        calls.append(epoch)
        if len(calls) == 2:
            raise _Interrupt
        return original(ctx, rt, epoch, stage_epoch)

    config = TrainConfig.from_dict(tiny_config(tmp_path / "cut", syn, **over))
    monkeypatch.setattr(trainer, "train_epoch", stop_second)
    with pytest.raises(_Interrupt):
        train(config)
    monkeypatch.setattr(trainer, "train_epoch", original)
    result = train(config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for a, b in zip(result.history, reference.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-7)


def test_stain_transfer_references_are_the_training_patients(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_pipeline draws references from the training split's fits only (never val/test)."""
    from types import SimpleNamespace

    import torch

    from wsi_cmaf.stain import MacenkoNormalizer
    from wsi_cmaf.train.config import DataConfig, ModelSection
    from wsi_cmaf.train.data import setup as data_setup
    from wsi_cmaf.train.data.augment import PatientStainNormalizer
    from wsi_cmaf.train.data.datasets import DataBundle

    stains = {"t1": _stain((0.5, 0.8, 0.35), (0.15, 0.9, 0.4), (1.4, 0.7)),
              "t2": _stain((0.7, 0.6, 0.4), (0.1, 0.95, 0.3), (2.0, 1.0)),
              "v1": _stain((0.6, 0.7, 0.3), (0.2, 0.8, 0.5), (1.0, 1.0))}
    normalizer = PatientStainNormalizer()
    for i, (pid, fit) in enumerate(stains.items()):
        normalizer._keys[pid] = f"p{i}"
        normalizer.normalizers[f"p{i}"] = MacenkoNormalizer().set_source(fit)
    monkeypatch.setattr(data_setup, "fit_patient_stain", lambda *_a, **_k: normalizer)
    bundle = DataBundle({}, {"train": SimpleNamespace(patient_ids=["t1", "t2", "t1", "t9"]),
                             "val": SimpleNamespace(patient_ids=["v1"])}, {})
    pipe = data_setup.build_pipeline(DataConfig(augment_kwargs={"stain_transfer_p": 0.3}),
                                     ModelSection(stain_normalization="macenko"), bundle, 0, torch.device("cpu"))
    assert pipe.augment.stain_maps.shape == (2, 3, 3)  # t1, t2 (t9 has no fit; v1 is validation)
