"""By-value checks of how the stages use the formulas: the gated fusion, the trainer's β ramp and
A-CBFL's α(t) across stages, and the effective class weights after imbalance resampling.

Every expected number is computed here by hand from the paper's formulas, not by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

TINY = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
            mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
            bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16, attention="nystrom")


# ----------------------------------------------------------------------------- gated fusion
def test_gated_fusion_formula_by_hand() -> None:
    """F_fused = g ⊙ F_att + (1 − g) ⊙ F_s', g = σ(W [F_att; F_s'] + b) (Sec. 4.3), with A from Eq. 13."""
    from wsi_cmaf.models.cmaf_block import CMAFBlock

    torch.manual_seed(0)
    block = CMAFBlock(spatial_dim=6, dim=8, num_heads=2).eval()
    with torch.no_grad():
        block.log_tau.copy_(torch.tensor([0.3, -0.2]))
        block.gate.weight.normal_(0, 0.5)
        block.gate.bias.normal_(0, 0.5)
    g_ = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(2, 6, 2, 3, generator=g_), torch.randn(2, 8, 2, 3, generator=g_)
    fused = block(f_s, f_t)

    # by hand, token by token
    s = F.layer_norm(f_s.flatten(2).transpose(1, 2) @ block.proj_s.weight.T + block.proj_s.bias, (8,),
                     block.norm_s.weight, block.norm_s.bias)  # (B, N, 8): the query map and local path
    t = F.layer_norm(f_t.flatten(2).transpose(1, 2), (8,), block.norm_t.weight, block.norm_t.bias)
    kv = t @ block.kv.weight.T + block.kv.bias
    k, v = kv[..., :8], kv[..., 8:]
    heads = []
    for h, tau in enumerate(torch.exp(torch.tensor([0.3, -0.2]))):
        q_h, k_h, v_h = s[..., 4 * h:4 * h + 4], k[..., 4 * h:4 * h + 4], v[..., 4 * h:4 * h + 4]
        a = torch.softmax(q_h @ k_h.transpose(1, 2) / (math.sqrt(4) * tau), dim=-1)  # Eq. 13
        heads.append(a @ v_h)
    att = torch.cat(heads, dim=-1)
    gate = torch.sigmoid(torch.cat([att, s], dim=-1) @ block.gate.weight.flatten(1).T + block.gate.bias)
    want = gate * att + (1 - gate) * s
    torch.testing.assert_close(fused.permute(0, 2, 3, 1).reshape(2, 6, 8), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- β ramp and α(t) in the trainer
def _alpha_by_hand(priors: np.ndarray, t: float, k: float = 5.0) -> np.ndarray:
    inv = 1.0 / priors
    inv = inv * len(inv) / inv.sum()
    s = (math.exp(-k * t) - math.exp(-k)) / (1 - math.exp(-k))
    return 1.0 + (inv - 1.0) * s


def test_trainer_wires_the_beta_ramp_and_alpha_schedule_across_stages(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 has no objective; stage 2 (ib: ramp, 2 epochs x 2 steps) ramps β over its 4 steps
    (0, 1/4, 1/2, 3/4) with α frozen at t = 0; stage 3 (ib: full, dynamic) has β at 1 and
    t = 0, 1/4, 1/2, 3/4, with α(t) = 1 + (α_inv − 1)·s(t), k = 5."""
    from wsi_cmaf.losses.objective import IBObjective
    from wsi_cmaf.train.config import TrainConfig
    from wsi_cmaf.train.engine.trainer import train

    seen: list[tuple[int, int, float, float, np.ndarray, np.ndarray]] = []
    real_update = IBObjective.update

    def spy(self, step, total_steps=None):
        real_update(self, step, total_steps)
        seen.append((id(self), step, self.beta_scale(), float(self.task_loss.progress),
                     self.task_loss.alpha().detach().double().numpy().copy(),
                     self.task_loss.priors.double().numpy().copy()))

    monkeypatch.setattr(IBObjective, "update", spy)
    cfg = TrainConfig.from_dict({
        "data": {"synthetic": {"n_patients": 8, "patches_per_patient": 12, "ratio": "60:40", "signal": 1.0},
                 "synthetic_dir": str(tmp_path / "syn"), "batch_size": 8, "micro_batch_size": None,
                 "eval_batch_size": 64, "max_steps_per_epoch": 2, "augment": False},
        "model": {"kwargs": TINY, "input_size": 32, "stain_normalization": None},
        "optim": {"sam": False}, "stages": {"epochs": [1, 2, 2]}, "early_stopping_patience": None,
        "output_dir": str(tmp_path / "run"), "bootstrap": 5, "log_every": 100, "progress_bar": False,
        "compile": "off", "precision": "off"})
    train(cfg)
    objectives = list(dict.fromkeys(o for o, *_ in seen))
    assert len(objectives) == 2  # stage 1 trains with plain cross-entropy: no objective
    fusion = [r for r in seen if r[0] == objectives[0]]
    finetune = [r for r in seen if r[0] == objectives[1]]
    assert [r[1] for r in fusion] == [0, 1, 2, 3] and [r[1] for r in finetune] == [0, 1, 2, 3]
    assert [r[2] for r in fusion] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert [r[2] for r in finetune] == [1.0, 1.0, 1.0, 1.0]
    assert [r[3] for r in fusion] == [0.0] * 4
    assert [r[3] for r in finetune] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    for _, _, _, t, alpha, priors in fusion + finetune:
        np.testing.assert_allclose(alpha, _alpha_by_hand(priors, t), rtol=1e-5)


# ----------------------------------------------------------------------------- effective class weights
def _effective_by_hand(n0: float, n1: float) -> tuple[float, float]:
    """α_c(0)·w_c: inverse frequency (mean 1 over classes) times π^(−1/2) (Σ π w = 1)."""
    p0, p1 = n0 / (n0 + n1), n1 / (n0 + n1)
    inv0, inv1 = 1 / p0, 1 / p1
    a0, a1 = 2 * inv0 / (inv0 + inv1), 2 * inv1 / (inv0 + inv1)
    r0, r1 = p0 ** -0.5, p1 ** -0.5
    z = p0 * r0 + p1 * r1
    return a0 * r0 / z, a1 * r1 / z


def test_effective_class_weights_after_resampling(tmp_path: Path) -> None:
    """A store with 190 negatives and 50 positives in train, resampled to 95:5, trains on 190 / 10;
    stage 2's effective weights are α(0)·w: 0.0856 and 7.0910, ratio 19^1.5 = 82.8."""
    from wsi_cmaf.losses import IBObjective, LossConfig
    from wsi_cmaf.train.data.datasets import build_dataloaders
    from wsi_cmaf.train.data.patchstore import write_patch_store

    labels = np.array([0] * 190 + [1] * 50 + [0, 1] * 10 + [0, 1] * 10)
    splits = np.array(["train"] * 240 + ["val"] * 20 + ["test"] * 20)
    patients = np.array([f"p{i // 20}" for i in range(len(labels))])
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    store = write_patch_store(tmp_path / "s.zarr", images, labels, patients, splits)
    bundle = build_dataloaders(store, batch_size=8, imbalance_ratio="95:5", seed=0)
    assert bundle.class_counts == {0: 190, 1: 10}
    assert len(bundle.datasets["val"]) == 20 and len(bundle.datasets["test"]) == 20  # untouched
    obj = IBObjective(LossConfig(loss="acbfl"), [bundle.class_counts[0], bundle.class_counts[1]])
    obj.set_progress(0.0)
    effective = (obj.ib_weights * obj.task_loss.alpha()).double().numpy()
    want = _effective_by_hand(190, 10)
    np.testing.assert_allclose(effective, want, rtol=1e-5)
    assert want == pytest.approx((0.0856205, 7.090962), rel=1e-5)
    assert effective[1] / effective[0] == pytest.approx(19 ** 1.5, rel=1e-5)


@pytest.mark.parametrize(("counts", "ratio"), [((198_738, 78_786), 4.006), ((99, 1), 985.0)])
def test_stage2_class_weighting_is_pi_to_the_minus_three_halves(counts, ratio) -> None:
    """MODEL.md: at IDC's natural mix the minority weighs 4.0× the majority, at 99:1 985×."""
    from wsi_cmaf.losses import IBObjective, LossConfig

    obj = IBObjective(LossConfig(loss="acbfl"), list(counts))
    obj.set_progress(0.0)
    eff = (obj.ib_weights * obj.task_loss.alpha()).double().numpy()
    assert eff[1] / eff[0] == pytest.approx(ratio, rel=1e-3)
    assert eff[1] / eff[0] == pytest.approx((counts[0] / counts[1]) ** 1.5, rel=1e-5)
