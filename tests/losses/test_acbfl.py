"""A-CBFL (Eq. 14) and the baseline losses: reductions to CE/focal, hand-computed constants, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses import (
    ACBFL,
    LOSSES,
    BalancedSoftmax,
    ClassBalancedLoss,
    FocalLoss,
    LDAMLoss,
    acbfl_alpha,
    acbfl_gammas,
    create_loss,
    effective_number_weights,
    ldam_margins,
)

IDC = (0.716, 0.284)  # benign / malignant priors of the IDC dataset (Sec. 5.1)
BREAKHIS_COUNTS = [444, 1014, 453, 569, 3451, 626, 792, 560]  # 8 classes, any imbalanced counts


def _batch(n: int = 64, c: int = 2, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target


def _ref_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Independent reference: probabilities via softmax, then the textbook formula, mean over batch."""
    p = torch.softmax(logits.double(), dim=1)[torch.arange(len(target)), target]
    return (-((1 - p) ** gamma) * torch.log(p)).mean()


# --- A-CBFL reductions ----------------------------------------------------------------------------
@pytest.mark.parametrize("c", [2, 8])
def test_acbfl_equals_cross_entropy_when_gamma0_alpha_uniform_lambda0(c: int) -> None:
    counts = BREAKHIS_COUNTS[:c] if c > 2 else [716, 284]
    logits, target = _batch(c=c)
    ce = F.cross_entropy(logits, target)
    via_switch = ACBFL(counts, gamma_base=0.0, use_alpha=False, lambda_smooth=0.0)
    torch.testing.assert_close(via_switch(logits, target), ce)
    # the same through the schedule: α(t=1) is exactly uniform
    via_schedule = ACBFL(counts, gamma_base=0.0, lambda_smooth=0.0)
    via_schedule.set_progress(1.0)
    torch.testing.assert_close(via_schedule(logits, target), ce)
    # ... and at t = 0 it is not (inverse-frequency weights), so the check above is not vacuous
    via_schedule.set_progress(0.0)
    assert not torch.allclose(via_schedule(logits, target), ce)


@pytest.mark.parametrize("c", [2, 8])
def test_acbfl_equals_focal_when_gammas_equal_and_alpha_uniform(c: int) -> None:
    counts = BREAKHIS_COUNTS[:c] if c > 2 else [716, 284]
    logits, target = _batch(c=c, seed=1)
    acbfl = ACBFL(counts, class_gamma=False, lambda_smooth=0.0)
    acbfl.set_progress(1.0)
    ref = _ref_focal(logits, target, 2.0).float()
    torch.testing.assert_close(acbfl(logits, target), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(FocalLoss(counts, gamma=2.0)(logits, target), ref, rtol=1e-5, atol=1e-6)
    # with class-dependent γ the minority classes are focused harder -> a different value
    full = ACBFL(counts, lambda_smooth=0.0)
    full.set_progress(1.0)
    assert not torch.allclose(full(logits, target), ref)


# --- γ_c: hand-computed -----------------------------------------------------------------------------
def test_gamma_idc_priors_hand_computed() -> None:
    # By hand: 0.716 / 0.284 = 2.5211268; sqrt -> 1.5878056; sqrt -> 1.2600816; x 2.0 = 2.5201632
    g = acbfl_gammas(IDC)
    assert g[0].item() == pytest.approx(2.0, abs=1e-12)  # majority keeps γ_base
    assert g[1].item() == pytest.approx(2.5201632, abs=1e-6)
    # counts instead of priors give the same γ (only ratios matter)
    torch.testing.assert_close(acbfl_gammas([198738, 78786]), g, rtol=2e-4, atol=0)


def test_gamma_99_to_1_hand_computed() -> None:
    # By hand: 99^(1/4): sqrt(99) = 9.9498744, sqrt(9.9498744) = 3.1543419; x 2.0 = 6.3086838
    g = acbfl_gammas([99, 1])
    assert g[0].item() == pytest.approx(2.0, abs=1e-12)
    assert g[1].item() == pytest.approx(6.3086838, abs=1e-6)
    assert acbfl_gammas([99, 1], gamma_base=1.0)[1].item() == pytest.approx(3.1543419, abs=1e-6)


def test_gamma_no_class_dependence_ablation() -> None:
    loss = create_loss("acbfl_no_class_gamma", class_counts=[99, 1])
    assert loss.gammas.tolist() == [2.0, 2.0]


# --- α_c(t) -------------------------------------------------------------------------------------------
def test_alpha_endpoints_exact() -> None:
    # Binary inverse frequency normalised to mean 1: α_c = 2·(1/π_c)/(1/π_0 + 1/π_1) = 2·π_other
    # -> by hand (2 x 0.284, 2 x 0.716) = (0.568, 1.432)
    a0 = acbfl_alpha(IDC, 0.0)
    assert a0.tolist() == pytest.approx([0.568, 1.432], abs=1e-12)
    assert acbfl_alpha(IDC, 1.0).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # outside [0, 1] is clipped
    assert acbfl_alpha(IDC, -3.0).tolist() == pytest.approx(a0.tolist(), abs=1e-12)
    assert acbfl_alpha(IDC, 7.0).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_alpha_schedule_is_exponential_and_mean_one() -> None:
    k = 5.0
    ts = [i / 10 for i in range(11)]
    minority = [acbfl_alpha(BREAKHIS_COUNTS, t, rate=k)[0].item() for t in ts]
    assert all(a > b for a, b in zip(minority, minority[1:]))  # strictly decreasing towards 1
    for t in ts:
        assert acbfl_alpha(BREAKHIS_COUNTS, t, rate=k).mean().item() == pytest.approx(1.0, abs=1e-12)
    # exponential: the distance to the asymptote e^{-k}/(1-e^{-k}) shrinks by e^{-k Δt} per step
    inv0 = acbfl_alpha(BREAKHIS_COUNTS, 0.0)[0].item() - 1.0
    offset = math.exp(-k) / (1 - math.exp(-k))
    g = [(a - 1.0) / inv0 + offset for a in minority]
    for a, b in zip(g, g[1:]):
        assert b / a == pytest.approx(math.exp(-k * 0.1), rel=1e-9)
    # rate 0 -> linear interpolation
    assert acbfl_alpha(IDC, 0.5, rate=0.0)[1].item() == pytest.approx((1.432 + 1.0) / 2, abs=1e-12)


def test_static_alpha_ablation_keeps_inverse_frequency() -> None:
    loss = create_loss("acbfl_no_dynamic", class_counts=[716, 284])
    for t in (0.0, 0.5, 1.0):
        loss.set_progress(t)
        assert loss.alpha().tolist() == pytest.approx([0.568, 1.432], abs=1e-6)
    dyn = create_loss("acbfl", class_counts=[716, 284])
    dyn.set_progress(0.5)
    assert dyn.alpha()[1].item() < 1.432 - 0.1


def test_set_progress_rejects_nan_and_clips() -> None:
    loss = ACBFL([3, 1])
    loss.set_progress(2.0)
    assert loss.progress == 1.0
    with pytest.raises(ConfigError):
        loss.set_progress(float("nan"))


# --- entropy term sign ----------------------------------------------------------------------------------
def test_entropy_term_is_a_confidence_penalty() -> None:
    logits, target = _batch(c=8, seed=2)
    base = ACBFL(BREAKHIS_COUNTS, lambda_smooth=0.0)
    smooth = ACBFL(BREAKHIS_COUNTS, lambda_smooth=0.3)
    p = torch.softmax(logits.double(), 1)
    entropy = -(p * p.log()).sum(1).mean()
    torch.testing.assert_close(smooth(logits, target).double(), base(logits, target).double() - 0.3 * entropy,
                               rtol=1e-5, atol=1e-6)
    # a gradient step on the penalty alone raises the entropy of the predictions (smoothing)
    x = logits.clone().requires_grad_(True)
    (smooth(x, target) - base(x, target)).backward()
    stepped = torch.softmax(logits - 0.1 * x.grad, 1)
    assert (-(stepped * stepped.log()).sum(1).mean()).item() > entropy.item()


# --- baselines ---------------------------------------------------------------------------------------------
def test_class_balanced_weights_follow_effective_number() -> None:
    # By hand, counts (100, 10), β = 0.99: 0.99^100 = 0.3660323, 0.99^10 = 0.9043821
    # E_100 = (1 - 0.3660323)/0.01 = 63.39677, E_10 = 9.56179; 1/E = (0.0157737, 0.1045829)
    # normalised to mean 1: sum = 0.1203566 -> (0.262117, 1.737883)
    w = effective_number_weights([100, 10], beta=0.99)
    assert w.tolist() == pytest.approx([0.262117, 1.737883], abs=2e-6)
    assert effective_number_weights([100, 10], beta=0.0).tolist() == pytest.approx([1.0, 1.0])
    # the loss applies them: CB-CE == mean of w_y * CE_i
    logits, target = _batch(seed=3)
    cb = ClassBalancedLoss([100, 10], beta=0.99)
    ref = (w.float()[target] * F.cross_entropy(logits, target, reduction="none")).mean()
    torch.testing.assert_close(cb(logits, target), ref)


def test_ldam_margins_scale_with_n_to_minus_quarter() -> None:
    # By hand: n^-1/4 for (1000, 100, 10) = (0.1778279, 0.3162278, 0.5623413); scaled so max = 0.5
    m = ldam_margins([1000, 100, 10], max_margin=0.5)
    assert m.tolist() == pytest.approx([0.1581139, 0.2811707, 0.5], abs=1e-6)
    logits, target = _batch(c=3, seed=4)
    ldam = LDAMLoss([1000, 100, 10], max_margin=0.5, scale=2.0)
    shifted = logits.clone()
    shifted[torch.arange(len(target)), target] -= m.float()[target]
    torch.testing.assert_close(ldam(logits, target), F.cross_entropy(2.0 * shifted, target))


def test_balanced_softmax_is_ce_on_logits_plus_log_prior() -> None:
    logits, target = _batch(c=8, seed=5)
    prior = torch.tensor(BREAKHIS_COUNTS, dtype=torch.float32)
    prior = prior / prior.sum()
    ref = F.cross_entropy(logits + prior.log(), target)
    torch.testing.assert_close(BalancedSoftmax(BREAKHIS_COUNTS)(logits, target), ref)


# --- registry, reductions, numerics ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("counts", [[716, 284], BREAKHIS_COUNTS])
def test_every_loss_builds_and_is_differentiable(name: str, counts: list[int]) -> None:
    loss = create_loss(name, class_counts=counts)
    loss.set_progress(0.3)
    logits, target = _batch(c=len(counts), seed=6)
    logits.requires_grad_(True)
    value = loss(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_finite_gradients_on_extreme_half_precision_logits(name: str) -> None:
    loss = create_loss(name, class_counts=[99, 1])
    logits = torch.tensor([[60000.0, -60000.0], [-60000.0, 60000.0], [0.0, 0.0], [60000.0, -60000.0]])
    logits = logits.half().requires_grad_(True)
    target = torch.tensor([0, 0, 1, 1])  # confident-right, confident-wrong, uncertain, confident-wrong
    value = loss(logits, target)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_autocast_bf16_computes_in_float32() -> None:
    loss = create_loss("acbfl", class_counts=BREAKHIS_COUNTS)
    layer = torch.nn.Linear(4, 8)
    x = torch.randn(16, 4)
    target = torch.randint(0, 8, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        value = loss(logits, target)
    assert logits.dtype == torch.bfloat16 and value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.float(), target))


def test_reductions() -> None:
    logits, target = _batch(c=8, seed=7)
    per = create_loss("acbfl", BREAKHIS_COUNTS, reduction="none")(logits, target)
    assert per.shape == (64,)
    torch.testing.assert_close(create_loss("acbfl", BREAKHIS_COUNTS, reduction="sum")(logits, target), per.sum())
    torch.testing.assert_close(create_loss("acbfl", BREAKHIS_COUNTS)(logits, target), per.mean())


def test_registry_aliases_and_errors() -> None:
    assert isinstance(create_loss("CE", [1, 2]), type(create_loss("cross_entropy", [1, 2])))
    assert isinstance(create_loss("A-CBFL", [1, 2]), ACBFL)
    assert isinstance(create_loss("cb", [1, 2], beta=0.9), ClassBalancedLoss)
    with pytest.raises(ConfigError, match="unknown loss"):
        create_loss("hinge", [1, 2])
    with pytest.raises(ConfigError, match="fixes"):
        create_loss("acbfl_no_class_gamma", [1, 2], class_gamma=True)
    with pytest.raises(ConfigError, match="bad arguments"):
        create_loss("focal", [1, 2], gamma_base=3.0)
    for bad in ([5], [3, 0], [3, float("nan")], [-1, 4]):
        with pytest.raises(ConfigError):
            create_loss("acbfl", bad)


def test_input_shape_errors() -> None:
    loss = create_loss("focal", [1, 2, 3])
    with pytest.raises(ConfigError, match="logits"):
        loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="target"):
        loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer"):
        loss(torch.randn(4, 3), torch.zeros(4))


def test_weighted_cross_entropy_weights_by_hand() -> None:
    # counts 90:10 -> priors 0.9, 0.1. Inverse: w ∝ (1/0.9, 10), scaled so 0.9 w0 + 0.1 w1 = 1:
    # raw (1.1111, 10) -> 0.9*1.1111 + 0.1*10 = 2 -> w = (0.5556, 5.0). Square root: raw
    # (1.0541, 3.1623) -> 0.9*1.0541 + 0.1*3.1623 = 1.2649 -> w = (0.8333, 2.5).
    inv = create_loss("weighted_cross_entropy", [90, 10])
    sq = create_loss("sqrt_ce", [90, 10])
    torch.testing.assert_close(inv.weight, torch.tensor([5 / 9, 5.0]))
    torch.testing.assert_close(sq.weight, torch.tensor([5 / 6, 2.5]))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    nll = torch.tensor([math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0))])
    torch.testing.assert_close(inv(logits, target), ((5 / 9) * nll[0] + 5.0 * nll[1]) / 2)
    torch.testing.assert_close(sq(logits, target), ((5 / 6) * nll[0] + 2.5 * nll[1]) / 2)
    torch.testing.assert_close(create_loss("cross_entropy", [90, 10])(logits, target), nll.mean())
    with pytest.raises(ConfigError, match="weighting"):
        create_loss("cross_entropy", [90, 10], weighting="log")
