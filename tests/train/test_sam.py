"""SAM optimizer: exact ascent step, exact restore, update equals base step at w + ε, loss decreases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.engine.sam import SAM


def _problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 5, generator=g)
    w_true = torch.randn(5, 3, generator=g)
    y = (x @ w_true).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, x, y


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_ascends_by_rho_and_second_step_restores(adaptive: bool) -> None:
    model, x, y = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.0)
    w0 = _flat(model).clone()
    F.cross_entropy(model(x), y).backward()
    g = _flat_grad(model).clone()
    opt.first_step(zero_grad=True)
    eps = _flat(model) - w0
    if adaptive:  # ε = ρ · w² g / ‖|w| g‖
        expected = 0.1 * w0 * w0 * g / (w0.abs() * g).norm()
    else:  # ε = ρ · g / ‖g‖, so ‖ε‖ = ρ
        expected = 0.1 * g / g.norm()
        assert eps.norm().item() == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    # lr = 0: the base step is a no-op, so the weights must be back to w exactly (bit for bit)
    assert torch.equal(_flat(model), w0)


def test_update_is_base_step_from_w_with_gradient_at_w_plus_eps() -> None:
    model, x, y = _problem(1)
    ref = copy.deepcopy(model)
    lr, rho = 0.5, 0.05
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    w0 = _flat(model).clone()
    loss0 = opt.step(closure)
    # independent computation on the copy: gradient at w, perturb, gradient there, SGD step from w
    ref_loss0 = F.cross_entropy(ref(x), y)
    ref_loss0.backward()
    g = _flat_grad(ref)
    with torch.no_grad():
        offset = 0
        for p in ref.parameters():
            n = p.numel()
            p.add_(rho * g[offset : offset + n].view_as(p) / g.norm())
            offset += n
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    g_adv = _flat_grad(ref)
    torch.testing.assert_close(_flat(model), w0 - lr * g_adv)
    assert loss0.item() == pytest.approx(ref_loss0.item(), rel=1e-6)  # step() returns the loss at w
    assert not torch.allclose(g_adv, g)  # the perturbation changed the gradient: SAM != SGD here


def test_sam_reduces_loss_on_tiny_problem() -> None:
    torch.manual_seed(0)
    model, x, y = _problem(2)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.05, weight_decay=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(60):
        opt.step(closure)
    final = F.cross_entropy(model(x), y).item()
    assert final < 0.5 * first
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9


def test_state_dict_roundtrip_and_shared_param_groups() -> None:
    model, x, y = _problem(3)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    assert opt.param_groups is opt.base_optimizer.param_groups
    opt.param_groups[0]["lr"] = 3e-4
    assert opt.base_optimizer.param_groups[0]["lr"] == 3e-4
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    state = opt.state_dict()
    assert "old_p" not in str(state["state"])
    opt2 = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    opt2.load_state_dict(state)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["lr"] == 3e-4
    torch.testing.assert_close(
        opt2.base_optimizer.state[next(model.parameters())]["exp_avg"],
        opt.base_optimizer.state[next(model.parameters())]["exp_avg"],
    )


def test_errors() -> None:
    model, _, _ = _problem()
    with pytest.raises(ConfigError):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigError, match="closure"):
        opt.step()


def _adamw_state(opt: SAM) -> dict:
    return {k: {n: t.clone() for n, t in v.items()} for k, v in opt.base_optimizer.state_dict()["state"].items()}


def test_nonfinite_first_pass_applies_no_perturbation() -> None:
    model, x, y = _problem(4)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    w0 = _flat(model).clone()
    F.cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    found = opt.first_step(zero_grad=True)
    assert float(found) == 1.0
    assert torch.equal(_flat(model), w0)  # ε = 0, and no NaN reached the weights
    model2, _, _ = _problem(4)
    F.cross_entropy(model2(x), y).backward()
    assert float(SAM(model2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1).first_step()) == 0.0


@pytest.mark.parametrize("fused", [True, False])  # fused: skipped on the device; else one host sync
def test_skipped_second_step_restores_w_and_leaves_the_optimizer_alone(fused: bool) -> None:
    model, x, y = _problem(5)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, fused=fused)
    for _ in range(2):  # some real steps first, so there is optimiser state to protect
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True, found_inf=torch.tensor(0.0))
    w0, state = _flat(model).clone(), _adamw_state(opt)
    assert all(float(v["step"]) == 2.0 for v in state.values())
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(_flat(model), w0)  # at w + ε
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True, found_inf=torch.tensor(1.0))  # e.g. the second pass overflowed
    assert torch.equal(_flat(model), w0)
    after = _adamw_state(opt)
    for key, value in state.items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after[key][name]), name


def test_found_inf_zero_is_the_plain_second_step() -> None:
    results = []
    for found in (None, torch.tensor(0.0)):
        model, x, y = _problem(6)
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, fused=True)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True, found_inf=found)
        results.append(_flat(model))
    assert torch.equal(results[0], results[1])
