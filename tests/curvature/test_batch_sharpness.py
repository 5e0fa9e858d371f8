"""Batch sharpness against dense torch.func Hessians of each mini-batch loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from torch_coherence._state import _bit_equal
from torch_coherence.curvature.batch_sharpness import batch_sharpness
from torch_coherence.lookahead import draw_batches


def _dense(model: nn.Module, loss, batches) -> float:
    """Mean of g^T H g / g^T g with H the dense Hessian of each batch loss (eval mode)."""
    model.eval()
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = dict(model.named_buffers())

    def f(flat, x, y):
        chunks = torch.split(flat, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss(functional_call(model, {**params, **buffers}, (x,)), y)

    vals = []
    for x, y in batches:
        g = torch.func.grad(f)(flat0, x, y)
        h = hessian(f)(flat0, x, y)
        vals.append(float(g @ h @ g / (g @ g)))
    model.train()
    return sum(vals) / len(vals)


def _case(kind: str):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    if kind == "ce":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        y = torch.randint(0, 3, (40,), generator=g)
        return model, nn.CrossEntropyLoss(), (x, y)
    if kind == "mse":
        model = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 2)).double()
        y = torch.randn(40, 2, generator=g, dtype=torch.float64)
        return model, nn.MSELoss(), (x, y)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.mark.parametrize("kind", ["ce", "mse", "bn_dropout"])
@pytest.mark.parametrize(("batch_size", "count"), [(1, 3), (8, 4), (40, 1)])
def test_matches_dense_hessian(kind: str, batch_size: int, count: int) -> None:
    model, loss, data = _case(kind)
    batches = draw_batches(data, batch_size, count, torch.Generator().manual_seed(2))
    model.train()
    state = [t.clone() for t in model.state_dict().values()]
    rng = torch.get_rng_state()
    value = batch_sharpness(model, loss, batches)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(_bit_equal(a, b) for a, b in zip(model.state_dict().values(), state, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert value == pytest.approx(_dense(model, loss, batches), rel=1e-9, abs=1e-12)


def test_quadratic_closed_form_and_bounds() -> None:
    """Least squares: H_B = 2 X_B^T X_B / B; the value lies within H_B's spectrum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    batches = draw_batches((x, y), 10, 3, torch.Generator().manual_seed(1))
    expected, top = [], []
    for xb, yb in batches:
        hb = 2 * xb.T @ xb / len(xb)
        gb = hb @ model.weight.detach().reshape(-1) - 2 * xb.T @ yb.reshape(-1) / len(xb)
        expected.append(float(gb @ hb @ gb / (gb @ gb)))
        top.append(float(torch.linalg.eigvalsh(hb)[-1]))
    value = batch_sharpness(model, nn.MSELoss(), batches)
    assert value == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert value <= sum(top) / 3


def test_zero_gradient_batches_are_skipped_and_all_zero_raises() -> None:
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    x = torch.randn(4, 2, dtype=torch.float64)
    zero = (x, torch.zeros(4, 1, dtype=torch.float64))  # w = 0 fits exactly: g = 0
    live = (x, torch.ones(4, 1, dtype=torch.float64))
    only_live = batch_sharpness(model, nn.MSELoss(), [live])
    assert batch_sharpness(model, nn.MSELoss(), [zero, live]) == pytest.approx(only_live)
    with pytest.raises(ValueError, match="zero on every batch"):
        batch_sharpness(model, nn.MSELoss(), [zero])


def test_bad_arguments() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="batches"):
        batch_sharpness(model, nn.MSELoss(), [])
    with pytest.raises(TypeError, match="model"):
        batch_sharpness("net", nn.MSELoss(), [(torch.ones(1, 2), torch.ones(1, 1))])
    with pytest.raises(ValueError, match="scalar"):
        batch_sharpness(model, nn.MSELoss(reduction="none"), [(torch.ones(2, 2), torch.ones(2, 1))])
