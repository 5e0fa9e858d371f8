"""SAM against hand-computed steps on a quadratic, and its optimizer plumbing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from torch_coherence.optim import SAM

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)


def _loss(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * w @ A @ w


def test_sam_step_matches_hand_computation() -> None:
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.2)
    _loss(w).backward()
    opt.first_step(zero_grad=True)
    g = A @ w0
    e = 0.1 * g / g.norm()
    torch.testing.assert_close(w.detach(), w0 + e)
    _loss(w).backward()
    opt.second_step(zero_grad=True)
    expected = w0 - 0.2 * (A @ (w0 + e))
    torch.testing.assert_close(w.detach(), expected)
    assert w.grad is None


def test_closure_step_equals_explicit_steps() -> None:
    w0 = torch.tensor([0.5, 1.5], dtype=torch.float64)
    w1 = w0.clone().requires_grad_(True)
    w2 = w0.clone().requires_grad_(True)
    o1 = SAM([w1], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    o2 = SAM([w2], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure() -> torch.Tensor:
        o1.zero_grad()
        loss = _loss(w1)
        loss.backward()
        return loss

    for _ in range(3):
        loss = o1.step(closure)
        assert torch.isclose(loss, _loss(w2).detach())
        _loss(w2).backward()
        o2.first_step(zero_grad=True)
        _loss(w2).backward()
        o2.second_step(zero_grad=True)
    torch.testing.assert_close(w1.detach(), w2.detach())


def test_adaptive_step() -> None:
    w0 = torch.tensor([2.0, -0.5], dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    opt = SAM([w], torch.optim.SGD, rho=0.3, adaptive=True, lr=0.1)
    _loss(w).backward()
    opt.first_step()
    g = A @ w0
    tg = w0.abs() * g
    e = 0.3 * w0.square() * g / tg.norm()
    torch.testing.assert_close(w.detach(), w0 + e)


@pytest.mark.filterwarnings("error")
def test_param_groups_shared_and_scheduler() -> None:
    w = torch.zeros(2, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=1.0, momentum=0.5)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["momentum"] == 0.5
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.sum().backward()
    opt.first_step(zero_grad=True)
    w.sum().backward()
    opt.second_step(zero_grad=True)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    state = copy.deepcopy(opt.state_dict())
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(model.state_dict())
    opt2 = SAM(clone.parameters(), torch.optim.SGD, rho=0.2, lr=1.0, momentum=0.0)
    opt2.load_state_dict(state)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups[0]["lr"] == 0.05
    buf = opt2.base_optimizer.state[clone.weight]["momentum_buffer"]
    torch.testing.assert_close(buf, opt.base_optimizer.state[model.weight]["momentum_buffer"])

    def closure2() -> torch.Tensor:
        opt2.zero_grad()
        loss = torch.nn.functional.mse_loss(clone(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    opt2.step(closure2)
    torch.testing.assert_close(clone.weight, model.weight)


@pytest.mark.parametrize("rho", [0.0, -1.0, math.inf, "0.1", True])
def test_invalid_rho(rho: object) -> None:
    with pytest.raises(ValueError, match="rho"):
        SAM([torch.zeros(1, requires_grad=True)], torch.optim.SGD, rho=rho, lr=0.1)


def test_invalid_base_and_missing_closure() -> None:
    p = torch.zeros(1, requires_grad=True)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM([p], torch.optim.SGD([p], lr=0.1), lr=0.1)
    opt = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
