"""dataset_sharpness against dense torch.func Hessians / GGNs of the mean training loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import TensorDataset

from torch_coherence.curvature import DatasetSharpness, dataset_sharpness

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def tiny_problem(kind: str, n: int = 40):
    """A tiny float64 model with BatchNorm (eval mode matters), data and a mean loss."""
    gen = torch.Generator().manual_seed({"ce": 0, "mse": 1, "cnn": 2, "bce": 3}[kind])
    torch.manual_seed(0)
    if kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 3),
        )
        x = torch.randn(n, 2, 4, 4, generator=gen, dtype=F64)
        y, loss = torch.randint(0, 3, (n,), generator=gen), nn.CrossEntropyLoss()
    else:
        c = {"ce": 4, "mse": 2, "bce": 2}[kind]
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, c))
        x = torch.randn(n, 5, generator=gen, dtype=F64)
        if kind == "ce":
            y, loss = torch.randint(0, c, (n,), generator=gen), nn.CrossEntropyLoss()
        elif kind == "mse":
            y, loss = torch.randn(n, c, generator=gen, dtype=F64), nn.MSELoss()
        else:
            y = torch.randint(0, 2, (n, c), generator=gen).to(F64)
            loss = nn.BCEWithLogitsLoss()
    model = model.to(F64)
    # non-trivial running statistics, so that eval mode differs from train mode
    with torch.no_grad():
        model.train()
        model(x * 1.7 + 0.3)
    return model, x, y, loss


def flat_fn(model: nn.Module):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def call(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(w, [s.numel() for s in shapes])
        params = {k: t.view(s) for k, t, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(model, params, (x,))

    return flat, call


def dense_top(model, x, y, loss, kind: str) -> float:
    """lambda_1 of the dense Hessian / GGN of the mean loss over all of x (eval mode)."""
    model.eval()
    flat, call = flat_fn(model)
    if kind == "hessian":
        mat = hessian(lambda w: loss(call(w, x), y))(flat)
    else:
        out = call(flat, x).detach()
        J = jacrev(lambda w: call(w, x).reshape(-1))(flat)  # (N C, d)
        Hf = hessian(lambda f: loss(f.view_as(out), y))(out.reshape(-1))  # (N C, N C)
        mat = J.T @ Hf @ J
    model.train()
    return float(torch.linalg.eigvalsh(0.5 * (mat + mat.T))[-1])


@pytest.mark.parametrize("problem", ["ce", "mse", "cnn", "bce"])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_matches_dense_reference_and_restores_state(problem: str, kind: str) -> None:
    model, x, y, loss = tiny_problem(problem)
    ref = dense_top(model, x, y, loss, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = dataset_sharpness(model, loss, (x, y), kind=kind, batch_size=7, tol=1e-10, max_iter=200)
    assert isinstance(res, DatasetSharpness)
    assert res.converged and res.kind == kind
    assert res.n_samples == res.n == x.shape[0]
    assert res.value == pytest.approx(ref, rel=1e-8)
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_minibatched_sum_equals_one_batch(kind: str) -> None:
    model, x, y, loss = tiny_problem("ce", n=37)
    one = dataset_sharpness(model, loss, (x, y), kind=kind, batch_size=37, tol=1e-12, max_iter=9)
    many = dataset_sharpness(model, loss, (x, y), kind=kind, batch_size=5, tol=1e-12, max_iter=9)
    assert many.iterations == one.iterations == 9
    assert many.value == pytest.approx(one.value, rel=1e-12)
    assert torch.allclose(many.vector, one.vector, atol=1e-9)


def test_dataset_of_pairs_equals_tensor_pair() -> None:
    model, x, y, loss = tiny_problem("mse")
    a = dataset_sharpness(model, loss, (x, y), tol=1e-10, max_iter=100)
    b = dataset_sharpness(model, loss, TensorDataset(x, y), batch_size=9, tol=1e-10, max_iter=100)
    assert b.value == pytest.approx(a.value, rel=1e-10)


def test_sample_is_seeded_uses_its_own_generator_and_is_the_subset_value() -> None:
    model, x, y, loss = tiny_problem("ce", n=60)
    state = torch.get_rng_state()
    a = dataset_sharpness(model, loss, (x, y), max_samples=25, seed=4, tol=1e-10, max_iter=100)
    assert torch.equal(torch.get_rng_state(), state)
    b = dataset_sharpness(model, loss, (x, y), max_samples=25, seed=4, tol=1e-10, max_iter=100)
    c = dataset_sharpness(model, loss, (x, y), max_samples=25, seed=5, tol=1e-10, max_iter=100)
    assert (a.n_samples, a.n) == (25, 60)
    assert a.value == b.value and torch.equal(a.vector, b.vector)
    assert c.value != a.value
    # the value is that of the drawn subset (a private generator seeded with ``seed``)
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(4))[:25]
    assert a.value == pytest.approx(dense_top(model, x[idx], y[idx], loss, "ggn"), rel=1e-8)


def test_warm_start_converges_in_fewer_products() -> None:
    model, x, y, loss = tiny_problem("cnn")
    cold = dataset_sharpness(model, loss, (x, y), tol=1e-6, max_iter=100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    warm = dataset_sharpness(model, loss, (x, y), tol=1e-6, max_iter=100, init_vector=cold.vector)
    recold = dataset_sharpness(model, loss, (x, y), tol=1e-6, max_iter=100)
    assert warm.value == pytest.approx(recold.value, rel=1e-5)
    assert warm.iterations < recold.iterations


def test_bad_arguments_name_the_argument() -> None:
    model, x, y, loss = tiny_problem("ce")
    with pytest.raises(ValueError, match="kind"):
        dataset_sharpness(model, loss, (x, y), kind="fisher")
    with pytest.raises(ValueError, match="data: inputs and targets"):
        dataset_sharpness(model, loss, (x, y[:-1]))
    with pytest.raises(TypeError, match="data must be"):
        dataset_sharpness(model, loss, 3)
    with pytest.raises(ValueError, match="max_samples"):
        dataset_sharpness(model, loss, (x, y), max_samples=0)
    with pytest.raises(ValueError, match="loss: class weights"):
        dataset_sharpness(model, nn.CrossEntropyLoss(weight=torch.ones(4, dtype=F64)), (x, y))
    with pytest.raises(ValueError, match="init_vector"):
        dataset_sharpness(model, loss, (x, y), init_vector=torch.ones(3))
