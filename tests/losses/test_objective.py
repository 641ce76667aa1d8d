"""The IB objective: β ramp, class-weighted IB weights, per-term breakdown, switches (hand-made aux)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses import IBObjective, LossConfig, beta_ramp, class_ib_weights

COUNTS = [716, 284]


def _aux(b: int = 6, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    aux = {
        "kl_s": torch.rand(b, generator=g) * 4,
        "kl_t": torch.rand(b, generator=g) * 2,
        "mi_st": torch.tensor(0.4),
        "reg_diversity": torch.tensor(-0.7),
        "reg_entropy": torch.tensor(2.1),
        "reg_orthogonality": torch.tensor(0.25),
        "mu_s": torch.zeros(b, 4),  # bottleneck widths (4) for kl_normalization="per_dim"
        "mu_t": torch.zeros(b, 4),
    }
    return {k: v.requires_grad_(requires_grad) for k, v in aux.items()}


def _batch(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 2, generator=g), torch.tensor([0, 1, 1, 0, 0, 1])[:b]


# --- β ramp ------------------------------------------------------------------------------------------
def test_beta_ramp_linear_and_cosine() -> None:
    assert [beta_ramp(s, 100) for s in (0, 25, 50, 100, 250)] == pytest.approx([0, 0.25, 0.5, 1, 1])
    assert beta_ramp(-5, 100) == 0.0
    assert beta_ramp(0, 0) == 1.0  # no ramp
    cos = [beta_ramp(s, 100, "cosine") for s in (0, 50, 100)]
    assert cos == pytest.approx([0.0, 0.5, 1.0])
    assert beta_ramp(10, 100, "cosine") < beta_ramp(10, 100)  # slow start
    with pytest.raises(ConfigError):
        beta_ramp(1, 10, "step")


def test_objective_ramp_and_fixed_beta_ablation() -> None:
    logits, target = _batch()
    aux = _aux()
    ramped = IBObjective(LossConfig(loss="cross_entropy", ramp_steps=100, class_weighted_ib=False), COUNTS)
    fixed = IBObjective(LossConfig(loss="cross_entropy", ramp_steps=100, fixed_beta=True, class_weighted_ib=False),
                        COUNTS)
    ce = F.cross_entropy(logits, target)
    out0 = ramped(logits, target, aux, step=0)
    torch.testing.assert_close(out0.total, ce)  # every IB weight starts at 0
    assert out0.terms["beta_scale"].item() == 0.0
    ramped.update(50)
    half = ramped(logits, target, aux).total - ce
    full = fixed(logits, target, aux, step=0).total - ce
    assert full.abs() > 1e-3
    torch.testing.assert_close(half, 0.5 * full)
    ramped.update(10_000)
    torch.testing.assert_close(ramped(logits, target, aux).total, fixed(logits, target, aux).total)


# --- total = task + Σ weights · terms --------------------------------------------------------------------
def test_total_matches_hand_assembly_and_breakdown_sums() -> None:
    logits, target = _batch()
    aux = _aux()
    cfg = LossConfig(
        loss="cross_entropy", fixed_beta=True, class_weighted_ib=False, kl_normalization="sum",
        beta1=0.01, beta2=0.005, diversity_weight=0.1, entropy_weight=0.2, orthogonality_weight=0.3,
    )
    out = IBObjective(cfg, COUNTS)(logits, target, aux)
    expected = (
        F.cross_entropy(logits, target)
        + 0.01 * (aux["kl_s"].mean() + aux["kl_t"].mean())
        + 0.005 * 0.4 + 0.1 * -0.7 + 0.2 * 2.1 + 0.3 * 0.25
    )
    torch.testing.assert_close(out.total, expected)
    parts = ["task", "kl", "mi_st", "reg_diversity", "reg_entropy", "reg_orthogonality"]
    torch.testing.assert_close(sum(out.terms[k] for k in parts), out.total.detach())
    assert out.terms["raw/mi_st"].item() == pytest.approx(0.4)
    floats = out.as_floats()
    assert floats["total"] == pytest.approx(expected.item(), rel=1e-6)
    assert all(isinstance(v, float) for v in floats.values())


def test_switches_and_missing_keys() -> None:
    logits, target = _batch()
    base = dict(loss="cross_entropy", fixed_beta=True, class_weighted_ib=False, kl_normalization="sum",
                diversity_weight=0.005)
    aux = _aux()
    aux["mi_st"] = torch.tensor(float("nan"))  # a switched-off term must not leak into the total
    no_mi = IBObjective(LossConfig(**base, use_mi=False), COUNTS)(logits, target, aux)
    assert torch.isfinite(no_mi.total) and "mi_st" not in no_mi.terms
    beta2_zero = IBObjective(LossConfig(**base, beta2=0.0), COUNTS)(logits, target, aux)
    assert torch.isfinite(beta2_zero.total)
    torch.testing.assert_close(beta2_zero.total, no_mi.total)
    # switching a term off removes exactly its contribution
    full = IBObjective(LossConfig(**base), COUNTS)(logits, target, _aux())
    no_div = IBObjective(LossConfig(**base, use_diversity=False), COUNTS)(logits, target, _aux())
    torch.testing.assert_close(full.total - no_div.total, torch.tensor(0.005 * -0.7))
    # CNN-only model: no contextual branch -> no kl_t, mi_st, attention regularisers
    cnn_only = {"kl_s": _aux()["kl_s"]}
    out = IBObjective(LossConfig(**base), COUNTS)(logits, target, cnn_only)
    torch.testing.assert_close(out.total, F.cross_entropy(logits, target) + 0.01 * cnn_only["kl_s"].mean())
    assert set(out.terms) == {"task", "kl", "raw/kl", "beta_scale"}
    # no aux at all (plain classifier)
    torch.testing.assert_close(
        IBObjective(LossConfig(**base), COUNTS)(logits, target).total, F.cross_entropy(logits, target)
    )


def test_gradients_reach_aux_terms_with_their_weights() -> None:
    logits, target = _batch()
    logits.requires_grad_(True)
    aux = _aux(requires_grad=True)
    obj = IBObjective(LossConfig(loss="acbfl", ramp_steps=10, kl_normalization="sum"), COUNTS)
    obj.update(0, total_steps=100)
    obj(logits, target, aux).total.backward()
    assert aux["kl_s"].grad is None or aux["kl_s"].grad.abs().sum() == 0  # β ramped to 0 at step 0
    logits.grad = None
    aux = _aux(requires_grad=True)
    obj.update(10, total_steps=100)
    obj(logits, target, aux).total.backward()
    torch.testing.assert_close(aux["kl_s"].grad, torch.full((6,), 0.01 / 6))
    assert aux["mi_st"].grad.item() == pytest.approx(0.005)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# --- class-weighted IB --------------------------------------------------------------------------------------
def test_class_ib_weights_binary_ratio_and_normalisation() -> None:
    pi0, pi1 = 0.716, 0.284
    w = class_ib_weights([pi0, pi1])
    assert (w[1] / w[0]).item() == pytest.approx(math.sqrt(pi0 / pi1), rel=1e-12)  # Sec. 3.3
    # by hand: sqrt(0.716/0.284) = 1.5878056
    assert (w[1] / w[0]).item() == pytest.approx(1.5878056, abs=1e-6)
    assert (w[0] * pi0 + w[1] * pi1).item() == pytest.approx(1.0, abs=1e-12)
    w99 = class_ib_weights([99, 1])
    assert (w99[1] / w99[0]).item() == pytest.approx(math.sqrt(99), rel=1e-12)


def test_class_ib_weights_multiclass_pairwise_sqrt() -> None:
    counts = [444, 1014, 453, 569, 3451, 626, 792, 560]
    w = class_ib_weights(counts)
    pi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    for a in range(8):
        for b in range(8):
            assert (w[a] / w[b]).item() == pytest.approx(math.sqrt(pi[b] / pi[a]), rel=1e-12)
    assert (pi * w).sum().item() == pytest.approx(1.0, abs=1e-12)


def test_class_weighted_ib_applies_w_to_task_loss() -> None:
    logits, target = _batch()
    w = class_ib_weights(COUNTS).float()
    out = IBObjective(LossConfig(loss="cross_entropy"), COUNTS)(logits, target)
    ref = (w[target] * F.cross_entropy(logits, target, reduction="none")).mean()
    torch.testing.assert_close(out.total, ref)
    torch.testing.assert_close(out.terms["task"], ref)


def test_update_drives_acbfl_progress() -> None:
    obj = IBObjective(LossConfig(loss="acbfl"), COUNTS)
    obj.update(0, total_steps=200)
    assert obj.task_loss.alpha().tolist() == pytest.approx([0.568, 1.432], abs=1e-6)
    obj.update(200, total_steps=200)
    assert obj.task_loss.alpha().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ConfigError):
        obj.update(1, total_steps=0)


# --- config ---------------------------------------------------------------------------------------------------
def test_loss_config_roundtrip_and_validation() -> None:
    cfg = LossConfig(loss="ldam", loss_kwargs={"max_margin": 0.3}, beta2=0.0, fixed_beta=True)
    again = LossConfig.from_dict(cfg.to_dict())
    assert again == cfg
    obj = IBObjective(again, [10, 90])
    assert obj.task_loss.margins.max().item() == pytest.approx(0.3)
    assert obj.task_loss.reduction == "none"
    with pytest.raises(ConfigError, match=r"LossConfig: unknown field\(s\) \[.betaa1.\]"):
        LossConfig.from_dict({"betaa1": 0.1})
    for bad in ({"beta1": -1.0}, {"beta2": float("inf")}, {"ramp_steps": -3}, {"loss": "hinge"},
                {"ramp_shape": "exp"}):
        with pytest.raises(ConfigError):
            LossConfig(**bad).validate()


# --- KL normalisation ----------------------------------------------------------------------------------------
def test_kl_per_dim_divides_each_branch_by_its_width() -> None:
    logits, target = _batch()
    aux = _aux()
    aux["mu_s"], aux["mu_t"] = torch.zeros(6, 64), torch.zeros(6, 16)  # widths 64 and 16
    cfg = dict(loss="cross_entropy", fixed_beta=True, class_weighted_ib=False, use_mi=False, use_diversity=False,
               use_entropy=False, use_orthogonality=False, beta1=0.01)
    per_dim = IBObjective(LossConfig(**cfg), COUNTS)(logits, target, aux)
    summed = IBObjective(LossConfig(**cfg, kl_normalization="sum"), COUNTS)(logits, target, aux)
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(per_dim.total, ce + 0.01 * (aux["kl_s"].mean() / 64 + aux["kl_t"].mean() / 16))
    torch.testing.assert_close(summed.total, ce + 0.01 * (aux["kl_s"].mean() + aux["kl_t"].mean()))
    # the default needs the widths: an aux without mu_* is an error, not a silent rescale
    no_mu = {k: v for k, v in _aux().items() if not k.startswith("mu_")}
    with pytest.raises(ConfigError, match="mu_s"):
        IBObjective(LossConfig(**cfg), COUNTS)(logits, target, no_mu)
    with pytest.raises(ConfigError):
        LossConfig(kl_normalization="mean").validate()
