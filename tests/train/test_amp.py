"""Mixed precision in training: what ``precision`` resolves to, and the fp16 + GradScaler path on CPU.

CPU fp16 autocast with ``torch.amp.GradScaler("cpu")`` runs the same code as CUDA fp16, so CI
(no GPU) catches regressions of: loss-scale calibration mistaken for divergence (the H200 failure
of issue 19), real divergence not stopped, SAM + scaler skipping a step but touching the weights.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers.train import tiny_config
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.config import OptimConfig, StageConfig, TrainConfig
from wsi_cmaf.train.engine import loop as trainer_loop
from wsi_cmaf.train.engine import trainer
from wsi_cmaf.train.engine.amp import DIVERGENCE_STREAK, Amp, SkipMonitor, resolve_precision
from wsi_cmaf.train.engine.clipping import AdaptiveGradClip
from wsi_cmaf.train.engine.loop import StageRuntime, optimizer_update
from wsi_cmaf.train.engine.sam import SAM
from wsi_cmaf.train.engine.schedules import build_scheduler
from wsi_cmaf.train.engine.stages import build_optimizer
from wsi_cmaf.train.engine.trainer import train

CPU = torch.device("cpu")


class Net(nn.Module):
    """A small BN network; ``poison`` makes every loss (and so every gradient) NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out * math.nan if self.poison else out


def _setup(amp_mode: str = "fp16", sam: bool = True, init_scale: float | None = None, lr: float = 1e-2,
           device: torch.device = CPU):
    torch.manual_seed(0)
    model = Net().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    x, y = x.to(device), y.to(device)
    stage = StageConfig("s", 1, lr, trainable="all", loss="cross_entropy", ib="off", schedule="constant")
    opt = build_optimizer({"model": model}, OptimConfig(sam=sam, weight_decay=0.0), lr)
    rt = StageRuntime(stage, 0, opt, build_scheduler("constant", opt), None, 1,
                      AdaptiveGradClip(list(model.parameters()), 0.01), [])
    ctx = SimpleNamespace(amp=Amp(amp_mode, device, init_scale=init_scale), model=model, heads=None,
                          config=SimpleNamespace(model=SimpleNamespace(num_classes=2)))
    return ctx, rt, x, y


def _loss(ctx, x, y) -> float:
    with torch.no_grad():
        ctx.model.eval()
        out = float(nn.functional.cross_entropy(ctx.model(x), y))
        ctx.model.train()
        return out


def test_precision_resolution() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda", bf16_supported=True) == "bf16"  # H100/H200/A100: no scaler
    assert resolve_precision("auto", "cuda", bf16_supported=False) == "fp16"  # V100/T4: fp16 + scaler
    assert resolve_precision("off", "cuda", bf16_supported=True) == "fp32"
    assert resolve_precision("fp16", "cpu") == "fp16" and resolve_precision("bf16", "cpu") == "bf16"
    auto = Amp("auto", CPU)
    assert auto.dtype is None and auto.scaler is None
    fp16 = Amp("fp16", CPU)
    assert fp16.dtype == torch.float16 and fp16.scaler is not None
    assert fp16.scaler.get_scale() == 2.0**16
    assert Amp("bf16", CPU).scaler is None


@pytest.mark.parametrize("sam", [True, False])
def test_fp16_gradscaler_trains_on_cpu(sam: bool) -> None:
    ctx, rt, x, y = _setup(sam=sam)
    before = _loss(ctx, x, y)
    found = [float(optimizer_update(ctx, rt, x, y, log=False)[2]) for _ in range(30)]
    after = _loss(ctx, x, y)
    assert sum(found) < 30  # updates were applied ...
    assert after < 0.7 * before, (before, after)  # ... and learned
    assert math.isfinite(ctx.amp.scaler.get_scale())


def test_calibration_skips_are_not_divergence() -> None:
    """A scale of 2^50 overflows fp16 at once: the scaler halves it per skipped update until it fits."""
    ctx, rt, x, y = _setup(init_scale=2.0**50)
    monitor = SkipMonitor(CPU)
    before = _loss(ctx, x, y)
    first_epoch = [float(optimizer_update(ctx, rt, x, y, log=False)[2]) for _ in range(3)]
    for f in first_epoch:
        monitor.record(torch.tensor(f), torch.tensor(0.0))
    assert first_epoch == [1.0, 1.0, 1.0]
    # Every step of this "epoch" was skipped, but the scale (2^47) explains it: no error.
    assert monitor.check(ctx.amp, "epoch 1", steps=3) == (3, 3)
    skipped = 3
    for _ in range(60):
        _, _, found = optimizer_update(ctx, rt, x, y, log=False)
        monitor.record(found, torch.tensor(0.0))
        monitor.check(ctx.amp, "epoch 2")
        skipped += int(found)
    assert DIVERGENCE_STREAK < skipped < 63  # a streak longer than the limit, yet calibration
    assert ctx.amp.scaler.get_scale() == 2.0 ** (50 - skipped)  # halved once per skip, no growth yet
    assert _loss(ctx, x, y) < 0.8 * before  # then it trained


@pytest.mark.parametrize(("amp_mode", "init_scale", "stops_at"), [
    ("fp16", None, DIVERGENCE_STREAK),  # 2^16 -> 2^-8 after 24 skips: below 1, streak 24
    ("fp16", 2.0**40, 41),  # the scale only falls below 1 after 41 skips
    ("off", None, DIVERGENCE_STREAK),  # no scaler: nothing to calibrate
])
def test_real_divergence_stops_with_a_clear_error(amp_mode: str, init_scale: float | None, stops_at: int) -> None:
    ctx, rt, x, y = _setup(amp_mode, init_scale=init_scale)
    ctx.model.poison = True
    monitor = SkipMonitor(CPU)
    w0 = [p.detach().clone() for p in ctx.model.parameters()]
    with pytest.raises(ConfigError, match="training diverged: .* had non-finite gradients") as exc:
        for step in range(1, 100):
            loss, _, found = optimizer_update(ctx, rt, x, y, log=False)
            monitor.record(found, loss)
            monitor.check(ctx.amp, f"step {step}")
    assert step == stops_at, str(exc.value)
    assert all(torch.equal(a, b) for a, b in zip(w0, ctx.model.parameters()))  # every update was skipped


def test_whole_epoch_skipped_without_scaler_is_divergence() -> None:
    ctx, rt, x, y = _setup("off")
    ctx.model.poison = True
    monitor = SkipMonitor(CPU)
    for _ in range(3):
        loss, _, found = optimizer_update(ctx, rt, x, y, log=False)
        monitor.record(found, loss)
    assert float(monitor.loss_sum) == 0.0  # NaN losses of skipped updates are not summed
    with pytest.raises(ConfigError, match="every step of epoch 1"):
        monitor.check(ctx.amp, "epoch 1", steps=3)


@pytest.mark.parametrize("sam", [True, False])
def test_skipped_step_leaves_weights_and_optimizer_untouched(sam: bool) -> None:
    ctx, rt, x, y = _setup(sam=sam)
    for _ in range(3):
        assert float(optimizer_update(ctx, rt, x, y, log=False)[2]) == 0.0
    ctx.amp.scaler.update(2.0**60)  # the next scaled backward overflows fp16
    weights = [p.detach().clone() for p in ctx.model.parameters()]
    state = copy.deepcopy(rt.optimizer.state_dict())
    _, _, found = optimizer_update(ctx, rt, x, y, log=False)
    assert float(found) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(weights, ctx.model.parameters()))
    after = rt.optimizer.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after["state"][key][name]), name
    assert ctx.amp.scaler.get_scale() == 2.0**59  # backed off once, although SAM made two passes


@pytest.mark.parametrize("sam", [True, False])
def test_each_pass_is_unscaled_exactly_once(sam: bool) -> None:
    """GradScaler with fp32 compute: scaling by 2^16 and unscaling are exact, so the updates must
    equal unscaled training; a pass unscaled twice (or not at all) would be off by 2^16."""
    runs = []
    for mode in ("off", "fp16"):
        ctx, rt, x, y = _setup(mode, sam=sam)
        ctx.amp.dtype = None  # keep the scaler, compute in fp32
        # SGD, no clipping: unlike Adam (and AGC, SAM's ascent) it is not blind to a gradient's scale
        params = list(ctx.model.parameters())
        rt.optimizer = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1) if sam else torch.optim.SGD(params, lr=0.1)
        rt.scheduler, rt.clipper = build_scheduler("constant", rt.optimizer), None
        for _ in range(5):
            assert float(optimizer_update(ctx, rt, x, y, log=False)[2]) == 0.0
        runs.append(torch.cat([p.detach().flatten() for p in ctx.model.parameters()]))
    assert ctx.amp.scaler is not None and ctx.amp.scaler.get_scale() == 2.0**16
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-7)


def test_train_fp16_on_cpu_survives_calibration(tmp_path, monkeypatch) -> None:
    """The H200 failure, on CPU: every step of an epoch is a calibration skip, and that is no error.

    (GradScaler's own 2^16 already overflows the first epoch of this tiny run; 2^40 makes sure.
    fp16 backward passes are slow on CPU, hence one short epoch without SAM.)
    """
    monkeypatch.setattr("wsi_cmaf.train.engine.amp.FP16_INIT_SCALE", 2.0**40)
    cfg = tiny_config(tmp_path / "run", tmp_path / "syn", precision="fp16", stages={"epochs": [1, 0, 0]},
                      optim={"sam": False})
    result = train(TrainConfig.from_dict(cfg))
    row = result.history[0]
    assert (row["steps"], row["skipped_steps"]) == (0, 3) and math.isnan(row["train_loss"])
    log = (result.val_history_path / "log.jsonl").read_text()
    assert '"skipped_steps": 3' in log


def test_train_stops_on_real_divergence(tmp_path, monkeypatch) -> None:
    original = trainer_loop.batch_loss

    def nan_loss(ctx, rt, x, y):
        loss, per_sample, terms, aux = original(ctx, rt, x, y)
        return loss * math.nan, per_sample, terms, aux

    monkeypatch.setattr(trainer_loop, "batch_loss", nan_loss)
    compiled = []
    monkeypatch.setattr(trainer, "compile_for_training", lambda *a, **k: compiled.append(a))
    cfg = tiny_config(tmp_path / "run", tmp_path / "syn", precision="off", compile="auto", device="cpu")
    with pytest.raises(ConfigError, match=r"every step of epoch 1 \(branches\) had non-finite gradients"):
        train(TrainConfig.from_dict(cfg))
    assert not compiled  # compile: auto stays eager on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter; needs a GPU")
@pytest.mark.parametrize(("amp_mode", "sam"), [("auto", True), ("auto", False), ("fp16", True)])
def test_cuda_update_makes_no_host_sync(amp_mode: str, sam: bool) -> None:
    """An update (forward, SAM, unscale, finiteness, AGC, step, scaler update) never waits for the GPU."""
    cuda = torch.device("cuda")
    ctx, rt, x, y = _setup(amp_mode, sam=sam, device=cuda)
    monitor = SkipMonitor(cuda)
    optimizer_update(ctx, rt, x, y, log=False)  # first call: lazily built state (AGC layout, moments)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss, _, found = optimizer_update(ctx, rt, x, y, log=False)
            monitor.record(found, loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert monitor.check(ctx.amp, "epoch 1", steps=3)[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter; needs a GPU")
def test_cuda_hsic_makes_no_host_sync() -> None:
    from wsi_cmaf.models.bottleneck import normalized_hsic

    x, y = torch.randn(32, 8, device="cuda"), torch.randn(32, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = normalized_hsic(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert 0.0 <= float(value) <= 1.0


def test_training_config_names_precision_not_amp(tmp_path) -> None:
    """``amp:`` is refused with the key to write instead; the four values match inference's."""
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{synthetic: {{n_patients: 4}}, synthetic_dir: {tmp_path / 'syn'}}}\namp: fp16\n")
    with pytest.raises(ConfigError, match=r"write precision: fp16"):
        TrainConfig.from_file(path)
    from wsi_cmaf.infer import InferenceConfig

    for value in ("auto", "bf16", "fp16", "off"):
        assert InferenceConfig(precision=value).precision == value
        assert TrainConfig.from_dict(tiny_config(tmp_path / "r", tmp_path / "syn", precision=value)).precision == value
    with pytest.raises(ConfigError, match="precision must be one of"):
        InferenceConfig(precision="fp8")
