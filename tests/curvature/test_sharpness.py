"""hessian_sharpness against the dense Hessian of torch.func.hessian on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from torch_coherence import linalg
from torch_coherence.curvature.sharpness import SharpnessResult, hessian_sharpness

F64 = torch.float64

# torch.func.hessian (the dense reference) loads forward-AD decompositions that use torch.jit
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def mlp_tanh(out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, out))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def problem(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """A tiny float64 model, a batch and its mean-reduced loss."""
    torch.manual_seed({"ce": 0, "mse": 1, "cnn": 2}[kind])
    if kind == "cnn":
        model, x = small_cnn(), torch.randn(6, 2, 6, 6)
        y, loss = torch.randint(0, 3, (6,)), nn.CrossEntropyLoss()
    elif kind == "ce":
        model, x = mlp_tanh(4), torch.randn(10, 5)
        y, loss = torch.randint(0, 4, (10,)), nn.CrossEntropyLoss()
    else:
        model, x = mlp_tanh(2), torch.randn(10, 5)
        y, loss = torch.randn(10, 2), nn.MSELoss()
    return model.to(F64), x.to(F64), y if y.dtype == torch.long else y.to(F64), loss


def dense_spectrum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module):
    """Eigenvalues (ascending) and eigenvectors of the full Hessian, flattened in order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(w: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(w, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return loss(functional_call(model, params, (x,)), y)

    return torch.linalg.eigh(hessian(f)(flat))


@pytest.mark.parametrize("kind", ["ce", "mse", "cnn"])
def test_matches_dense_eigvalsh(kind: str) -> None:
    model, x, y, loss = problem(kind)
    evals, _ = dense_spectrum(model, x, y, loss)
    params = list(model.parameters())
    res = hessian_sharpness(lambda: loss(model(x), y), params, tol=1e-10, max_hvps=200)
    assert isinstance(res, SharpnessResult)
    assert res.converged
    assert res.value == pytest.approx(float(evals[-1]), rel=1e-9)
    # the returned vector is a unit eigenvector of the dense Hessian
    assert res.vector.dtype == F64 and res.vector.shape == (sum(p.numel() for p in params),)
    assert float(res.vector.norm()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["ce", "mse", "cnn"])
@pytest.mark.parametrize("stop", ["value", "residual"])
def test_default_tolerance_reached_within_20_hvps(kind: str, stop: str) -> None:
    model, x, y, loss = problem(kind)
    evals, _ = dense_spectrum(model, x, y, loss)
    res = hessian_sharpness(lambda: loss(model(x), y), list(model.parameters()), stop=stop)
    assert res.converged and res.hvp_count <= 20
    assert res.value == pytest.approx(float(evals[-1]), rel=1e-4)
    if stop == "residual":
        assert res.residual <= 1e-4 * abs(res.value)


def spread_spectrum(gen: torch.Generator, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with a decaying spectrum (top gap 5%) and its eigenvalues."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    evals = 10.0 * 0.95 ** torch.arange(n, dtype=F64)
    return Q @ torch.diag(evals) @ Q.T, evals


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
def test_lanczos_value_stop_is_accurate_and_cheaper(tol: float) -> None:
    A, _ = spread_spectrum(torch.Generator().manual_seed(5))
    v0 = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(6), dtype=F64)
    by_value = linalg.lanczos(lambda v: A @ v, v0, tol=tol, max_iter=300, stop="value")
    by_residual = linalg.lanczos(lambda v: A @ v, v0, tol=tol, max_iter=300)
    assert by_value.converged and by_residual.converged
    assert abs(by_value.value - 10.0) <= tol * 10.0
    assert by_value.matvecs < by_residual.matvecs
    # the default is unchanged: the residual rule
    assert by_residual.residual <= tol * by_residual.value


def test_lanczos_value_stop_from_an_eigenvector_and_bad_stop() -> None:
    A, _ = spread_spectrum(torch.Generator().manual_seed(7), n=50)
    evecs = torch.linalg.eigh(A).eigenvectors
    res = linalg.lanczos(lambda v: A @ v, evecs[:, -1], tol=1e-8, stop="value")
    assert res.converged and res.matvecs == 1  # invariant subspace: exact after one product
    with pytest.raises(ValueError, match="stop must be one of"):
        linalg.lanczos(lambda v: A @ v, evecs[:, -1], stop="change")


def test_float32_model_and_reproducible_seed() -> None:
    model, x, y, loss = problem("ce")
    evals, _ = dense_spectrum(model, x, y, loss)
    model, x = model.float(), x.float()
    params = list(model.parameters())
    a = hessian_sharpness(lambda: loss(model(x), y), params, seed=3)
    b = hessian_sharpness(lambda: loss(model(x), y), params, seed=3)
    assert a.value == b.value and torch.equal(a.vector, b.vector)
    assert a.vector.dtype == F64
    assert a.value == pytest.approx(float(evals[-1]), rel=1e-4)


def test_warm_start_needs_fewer_hvps() -> None:
    """After a small SGD step the previous eigenvector is a good start."""
    model, x, y, loss = problem("cnn")
    params = list(model.parameters())
    cold = hessian_sharpness(
        lambda: loss(model(x), y), params, tol=1e-10, max_hvps=200, stop="residual"
    )
    same = hessian_sharpness(lambda: loss(model(x), y), params, init_vector=cold.vector)
    assert same.hvp_count <= 2
    assert same.value == pytest.approx(cold.value, rel=1e-10)
    g = torch.autograd.grad(loss(model(x), y), params)
    with torch.no_grad():
        for p, gp in zip(params, g, strict=True):
            p.sub_(1e-3 * gp)
    evals, _ = dense_spectrum(model, x, y, loss)
    new_cold = hessian_sharpness(lambda: loss(model(x), y), params, tol=1e-6, max_hvps=200)
    warm = hessian_sharpness(
        lambda: loss(model(x), y), params, tol=1e-6, max_hvps=200, init_vector=cold.vector
    )
    assert warm.value == pytest.approx(float(evals[-1]), rel=1e-6)
    assert new_cold.value == pytest.approx(float(evals[-1]), rel=1e-6)
    assert warm.hvp_count < new_cold.hvp_count


def test_largest_algebraic_eigenvalue_of_an_indefinite_hessian() -> None:
    """Power iteration would return -10 (largest modulus); the sharpness is +3."""
    torch.manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    A = Q @ torch.diag(torch.tensor([-10.0, -1.0, 0.0, 0.5, 2.0, 3.0], dtype=F64)) @ Q.T
    w = torch.randn(6, dtype=F64, requires_grad=True)
    res = hessian_sharpness(lambda: 0.5 * w @ A @ w + w.sum(), [w], tol=1e-12)
    assert res.value == pytest.approx(3.0, rel=1e-12)
    assert abs(float(res.vector @ Q[:, 5])) == pytest.approx(1.0, abs=1e-8)


def test_grads_and_parameters_untouched_and_no_grad_mode_ok() -> None:
    model, x, y, loss = problem("ce")
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 7.0)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():  # the closure is evaluated with grad enabled anyway
        res = hessian_sharpness(lambda: loss(model(x), y), params)
    assert res.converged
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0))
    assert all(p.grad is None for p in params[1:])
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


def test_unused_and_linear_parameters_give_zero_rows() -> None:
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    unused = torch.zeros(3, dtype=F64, requires_grad=True)
    lin = torch.ones(2, dtype=F64, requires_grad=True)
    res = hessian_sharpness(lambda: (w**4).sum() + lin.sum(), [unused, w, lin], tol=1e-12)
    assert res.value == pytest.approx(48.0, rel=1e-12)  # d^2/dw^2 w^4 = 12 w^2 at w = 2
    assert float(res.vector[4].abs()) == pytest.approx(1.0, abs=1e-10)
    zero = hessian_sharpness(lambda: lin.sum() * 2, [lin])  # no second derivative at all
    assert zero.value == 0.0 and zero.converged


def test_max_hvps_caps_the_work() -> None:
    model, x, y, loss = problem("cnn")
    res = hessian_sharpness(lambda: loss(model(x), y), list(model.parameters()), max_hvps=2)
    assert res.hvp_count == 2 and not res.converged


def test_argument_errors_name_the_argument() -> None:
    model, x, y, loss = problem("ce")
    params = list(model.parameters())
    n = sum(p.numel() for p in params)

    def closure() -> torch.Tensor:
        return loss(model(x), y)

    with pytest.raises(ValueError, match="max_hvps must be an integer >= 1"):
        hessian_sharpness(closure, params, max_hvps=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        hessian_sharpness(closure, params, tol=0.0)
    with pytest.raises(ValueError, match="params must contain at least one tensor"):
        hessian_sharpness(closure, [])
    with pytest.raises(TypeError, match="params must be a sequence of tensors"):
        hessian_sharpness(closure, params[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"params\[1\] .* does not require grad"):
        hessian_sharpness(closure, [params[0], torch.zeros(2)])
    with pytest.raises(ValueError, match=r"params\[1\] is the same tensor as params\[0\]"):
        hessian_sharpness(closure, [params[0], params[0]])
    with pytest.raises(ValueError, match=rf"init_vector must be a flat vector .*\({n}\)"):
        hessian_sharpness(closure, params, init_vector=torch.ones(n + 1))
    with pytest.raises(ValueError, match="init_vector must be finite and non-zero"):
        hessian_sharpness(closure, params, init_vector=torch.zeros(n))
    with pytest.raises(ValueError, match="loss_fn must return a scalar loss"):
        hessian_sharpness(
            lambda: nn.functional.cross_entropy(model(x), y, reduction="none"), params
        )
    with pytest.raises(ValueError, match="does not depend on params"):
        hessian_sharpness(lambda: closure().detach(), params)
    with pytest.raises(ValueError, match="non-finite loss"):
        hessian_sharpness(lambda: closure() * float("nan"), params)
    with pytest.raises(ValueError, match="stop must be one of"):
        hessian_sharpness(closure, params, stop="theta")
    with pytest.raises(TypeError, match="seed must be an int"):
        hessian_sharpness(closure, params, seed=1.5)  # type: ignore[arg-type]
