"""CMAF block equations, temperature init, regularisers, bottleneck KL, HSIC, Nyström."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models import TAU_INITS_TABLE7, CMAFConfig, parse_tau_init
from wsi_cmaf.models.bottleneck import VariationalBottleneck, gaussian_kl, normalized_hsic
from wsi_cmaf.models.cmaf_block import CMAFBlock, diversity_regulariser, init_log_tau
from wsi_cmaf.models.nystrom import iterative_pinv, nystrom_attention

torch.set_num_threads(2)


def _block(**kw) -> CMAFBlock:
    torch.manual_seed(0)
    return CMAFBlock(spatial_dim=32, dim=48, num_heads=4, **kw).eval()


def _inputs(b: int = 2, h: int = 5, w: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 32, h, w, generator=g), torch.randn(b, 48, h, w, generator=g)


def test_lognormal_tau_init_statistics_over_many_seeds():
    """tau ~ LogNormal(0, 0.1): log tau has mean ~0 and std ~0.1 across seeds and heads."""
    logs = torch.cat([
        init_log_tau("lognormal(0,0.1)", 8, torch.Generator().manual_seed(s)) for s in range(500)
    ])
    assert logs.numel() == 4000
    assert abs(float(logs.mean())) < 0.01  # standard error 0.0016
    assert 0.095 < float(logs.std()) < 0.105
    assert float(logs.exp().min()) > 0


def test_block_draws_tau_from_its_config():
    taus = []
    for seed in range(200):
        torch.manual_seed(seed)
        taus.append(CMAFBlock(8, 16, num_heads=8).log_tau.detach())
    logs = torch.stack(taus)
    assert logs.std(dim=0).min() > 0.07  # heads and seeds really differ
    assert abs(float(logs.mean())) < 0.02 and 0.09 < float(logs.std()) < 0.11


@pytest.mark.parametrize("spec", TAU_INITS_TABLE7)
def test_table7_initialisations(spec):
    kind, p = parse_tau_init(spec)
    tau = torch.cat([init_log_tau(spec, 8, torch.Generator().manual_seed(s)) for s in range(300)]).exp()
    if kind == "fixed":
        torch.testing.assert_close(tau, torch.full_like(tau, p[0]))
    elif kind == "uniform":
        assert float(tau.min()) >= p[0] and float(tau.max()) <= p[1]
        assert abs(float(tau.mean()) - (p[0] + p[1]) / 2) < 0.03
    elif kind == "normal":
        assert abs(float(tau.mean()) - p[0]) < 0.01 and abs(float(tau.std()) - p[1]) < 0.01
    else:
        assert abs(float(tau.log().std()) - p[1]) < 0.05 * p[1] + 0.005


@pytest.mark.parametrize("bad", ["lognormal(0)", "gamma(1,1)", "fixed(-1)", "uniform(2,1)", "normal(1,x)"])
def test_bad_tau_specs_are_rejected(bad):
    with pytest.raises(ModelConfigError):
        CMAFConfig(tau_init=bad)


def test_sdpa_path_equals_eq13_by_hand():
    """The fused path (tau folded into q) equals Eq. 13 computed explicitly per head."""
    block = _block()
    with torch.no_grad():
        block.log_tau.copy_(torch.tensor([-0.7, 0.0, 0.3, 1.2]))  # very different temperatures
    f_s, f_t = _inputs()
    with torch.no_grad():
        fused_fast = block(f_s, f_t)
        aux: dict = {}
        fused_aux = block(f_s, f_t, aux)
        s_tok = block.norm_s(block.proj_s(f_s.flatten(2).transpose(1, 2)))
        t_tok = block.norm_t(f_t.flatten(2).transpose(1, 2))
        k, _ = block.kv(t_tok).chunk(2, dim=-1)
        for h in range(4):
            sl = slice(12 * h, 12 * (h + 1))
            logits = s_tok[..., sl] @ k[..., sl].transpose(1, 2) / (math.sqrt(12) * block.tau[h])
            torch.testing.assert_close(aux["attn"][:, h], torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_fast, fused_aux, atol=1e-5, rtol=1e-4)


def test_attention_entropy_rises_monotonically_with_tau():
    block = _block()
    f_s, f_t = _inputs(h=7, w=7)
    means = []
    for tau in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0):
        with torch.no_grad():
            block.log_tau.fill_(math.log(tau))
            aux: dict = {}
            block(f_s, f_t, aux)
        means.append(aux["attn_entropy"])
    ent = torch.stack(means)  # (n_tau, H): per head as well
    assert (ent[1:] > ent[:-1]).all(), ent
    assert float(ent[-1].min()) > 0.95 * math.log(49)  # near uniform at high temperature


def test_diversity_regulariser_bounds():
    one_hot = torch.eye(4).expand(1, 2, 4, 4).clone()
    assert float(diversity_regulariser(one_hot)) == pytest.approx(0.0)  # identical heads
    disjoint = torch.stack([torch.eye(4), torch.eye(4).roll(1, dims=1)])[None]
    assert float(diversity_regulariser(disjoint)) == pytest.approx(-1.0)  # fully different heads


def test_entropy_and_orthogonality_regularisers():
    block = _block()
    f_s, f_t = _inputs()
    aux: dict = {}
    block(f_s, f_t, aux)
    w = aux["entropy_weights"]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    expected = (w * aux["attn_entropy"] / math.log(25)).sum()
    torch.testing.assert_close(aux["reg_entropy"], expected)
    assert 0.0 <= float(aux["reg_orthogonality"].detach()) <= 1.0
    block2 = _block(reg_orthogonality=False, reg_diversity=False, reg_entropy=False)
    aux2: dict = {}
    block2(f_s, f_t, aux2)
    assert not {"reg_orthogonality", "reg_diversity", "reg_entropy"} & set(aux2)


def test_fixed_temperature_is_not_trained():
    block = _block(learn_temperature=False, tau_init="fixed(0.5)")
    assert "log_tau" not in dict(block.named_parameters())
    assert "log_tau" in block.state_dict()
    torch.testing.assert_close(block.tau, torch.full((4,), 0.5))


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    vib = VariationalBottleneck(10, 6)
    h = torch.randn(5, 10) * 3
    z, mu, logvar = vib(h)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref, atol=1e-5, rtol=1e-5)
    assert float(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max()) == 0.0
    assert not torch.equal(z, mu)  # training: reparameterised sample
    vib.eval()
    z_eval, mu_eval, _ = vib(h)
    torch.testing.assert_close(z_eval, mu_eval)


def test_model_kl_in_aux_is_closed_form():
    from wsi_cmaf.models import create_model

    torch.manual_seed(0)
    model = create_model("cmaf_net").train()
    _, aux = model.forward_with_aux(torch.randn(3, 3, 64, 64))
    for t in ("s", "t"):
        mu, logvar = aux[f"mu_{t}"], aux[f"logvar_{t}"]
        expect = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
        torch.testing.assert_close(aux[f"kl_{t}"], expect)
        assert aux[f"kl_{t}"].requires_grad


def test_normalized_hsic_detects_dependence():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g)
    indep, dep = [], []
    for n in (32, 128, 256):
        x = torch.randn(n, 8, generator=g)
        y_indep = torch.randn(n, 8, generator=g)
        y_dep = torch.tanh(x @ w) + 0.05 * torch.randn(n, 8, generator=g)
        indep.append(float(normalized_hsic(x, y_indep)))
        dep.append(float(normalized_hsic(x, y_dep)))
    assert float(normalized_hsic(x, x)) == pytest.approx(1.0, abs=1e-5)
    # the biased estimator's floor for independent data shrinks with n; dependence does not
    assert indep[0] > indep[1] > indep[2] and indep[2] < 0.1, indep
    assert min(dep) > 0.5, dep
    xg = x.clone().requires_grad_(True)
    normalized_hsic(xg, y_dep).backward()
    assert xg.grad.abs().sum() > 0
    assert float(normalized_hsic(x[:2], y_dep[:2])) == 0.0  # too few samples: no estimate


def test_iterative_pinv_converges_on_stochastic_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 16, 16, generator=g) * 2, dim=-1)
    z = iterative_pinv(a, iters=20)
    torch.testing.assert_close(a @ z @ a, a, atol=1e-4, rtol=1e-3)


def _smooth_tokens(n: int = 256, d: int = 16):
    """Tokens varying smoothly along the sequence, as neighbouring image patches do."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, n)[:, None]
    base = torch.sin(2 * math.pi * t * torch.randn(1, d, generator=g) * 3 + torch.rand(1, d, generator=g) * 6)
    q = base + 0.05 * torch.randn(n, d, generator=g)
    k = base @ torch.randn(d, d, generator=g) / d**0.5 + 0.05 * torch.randn(n, d, generator=g)
    v = torch.randn(n, d, generator=g)
    return q[None, None], k[None, None], v[None, None]


def test_nystrom_approaches_exact_attention_as_landmarks_grow():
    q, k, v = _smooth_tokens()
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v

    def err(m: int, iters: int) -> float:
        return float((nystrom_attention(q, k, v, m, iters) - exact).norm() / exact.norm())

    exact_pinv = [err(m, 0) for m in (8, 16, 32, 64, 128)]
    assert all(b < a for a, b in zip(exact_pinv, exact_pinv[1:])), exact_pinv
    assert exact_pinv[-1] < 1e-3
    default = [err(m, 6) for m in (4, 16, 64)]  # the Newton-Schulz pinv used in the model
    assert default[0] > default[1] > default[2] and default[2] < 0.05, default
    assert err(256, 6) < 1e-5  # N <= m: exact attention path
