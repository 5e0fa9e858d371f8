"""tracked_sharpness against a dense torch.func reference, and its unbiasedness by Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torch_coherence.curvature import dataset_sharpness, tracked_sharpness


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


def _case(arch: str, loss_name: str, n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = (_mlp() if arch == "mlp" else _cnn()).double()
    d_in = 4 if arch == "mlp" else 16
    x = torch.randn(n, d_in, dtype=torch.float64)
    if loss_name == "ce":
        loss, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (n,))
    else:
        loss, y = nn.MSELoss(), torch.randn(n, 3, dtype=torch.float64)
    return model, loss, x, y


def _dense(model: nn.Module, loss: nn.Module, x, y, kind: str) -> torch.Tensor:
    """Per-sample GGN J_i^T Lambda_i J_i (jacrev, hessian of the loss in output space) or
    per-sample Hessian, (n, P, P), from the flat parameters."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(w):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            out[k] = w[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    def f(w, xi):
        return functional_call(model, unflat(w), (xi[None],))[0]

    def li(o, yi):  # the per-sample loss whose mean is the training loss
        if isinstance(loss, nn.CrossEntropyLoss):
            return nn.functional.cross_entropy(o[None], yi[None])
        return nn.functional.mse_loss(o, yi, reduction="sum") / o.numel()

    mats = []
    for xi, yi in zip(x, y, strict=True):
        if kind == "ggn":
            J = jacrev(f)(w0, xi)  # (C, P)
            lam = hessian(li)(f(w0, xi), yi)  # (C, C)
            mats.append(J.T @ lam @ J)
        else:
            mats.append(hessian(lambda w, xi=xi, yi=yi: li(f(w, xi), yi))(w0))
    return torch.stack(mats)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_per_sample_quotients_match_the_dense_reference(arch, loss_name, kind) -> None:
    model, loss, x, y = _case(arch, loss_name, 7)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mats = _dense(model, loss, x, y, kind)
    u = v / v.norm()
    ref = torch.einsum("p,ipq,q->i", u, mats, u)
    res = tracked_sharpness(model, loss, x, y, 3.0 * v, kind=kind)
    assert res.per_sample == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert res.value == pytest.approx(float(ref.mean()), rel=1e-9)
    assert res.stderr == pytest.approx(float(ref.std() / math.sqrt(7)), rel=1e-9)
    assert res.m == 7 and res.kind == kind


def test_equals_the_top_eigenvalue_at_the_top_eigenvector_of_the_whole_set() -> None:
    """With all n examples and v the data-set Lanczos vector, r is lambda_1 (stderr 0)."""
    model, loss, x, y = _case("mlp", "ce", 30)
    top = dataset_sharpness(model, loss, (x, y), kind="ggn", tol=1e-10, max_iter=60)
    res = tracked_sharpness(model, loss, x, y, top.vector, n=30)
    assert res.value == pytest.approx(top.value, rel=1e-7)
    assert res.stderr == 0.0
    dense = _dense(model, loss, x, y, "ggn").mean(0)
    assert res.value <= float(torch.linalg.eigvalsh(dense)[-1]) * (1 + 1e-9)


@pytest.mark.parametrize(("arch", "loss_name"), [("mlp", "ce"), ("cnn", "mse")])
def test_unbiased_over_batch_draws_with_an_honest_stderr(arch, loss_name) -> None:
    """Monte Carlo over 400 batches of 6 of n = 40 (without replacement): the mean of r is
    v^T G_n v (z-score), and the mean squared stderr matches the variance of r."""
    n, m, draws = 40, 6, 400
    model, loss, x, y = _case(arch, loss_name, n, seed=3)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = v / v.norm()
    truth = float(u @ _dense(model, loss, x, y, "ggn").mean(0) @ u)
    gen = torch.Generator().manual_seed(5)
    values, se2 = [], []
    for _ in range(draws):
        idx = torch.randperm(n, generator=gen)[:m]
        res = tracked_sharpness(model, loss, x[idx], y[idx], v, n=n)
        values.append(res.value)
        se2.append(res.stderr**2)
    r = torch.tensor(values, dtype=torch.float64)
    z = (float(r.mean()) - truth) / (float(r.std()) / math.sqrt(draws))
    assert abs(z) < 4.0, z
    assert 0.7 < (sum(se2) / draws) / float(r.var()) < 1.4


def test_model_state_and_rng_untouched() -> None:
    model, loss, x, y = _case("cnn", "ce", 5)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    P = sum(p.numel() for p in model.parameters())
    tracked_sharpness(model, loss, x, y, torch.ones(P), kind="hessian")
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k])
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "fisher"}, "kind must be one of"),
        ({"vector": torch.ones(3)}, "init_vector must be a flat vector"),
        ({"vector": "v"}, "vector must be a torch.Tensor"),
        ({"n": 2}, "n must be an int >= the batch size"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match) -> None:
    model, loss, x, y = _case("mlp", "ce", 5)
    P = sum(p.numel() for p in model.parameters())
    args = {"vector": torch.ones(P), **kwargs}
    vector = args.pop("vector")
    with pytest.raises((ValueError, TypeError), match=match):
        tracked_sharpness(model, loss, x, y, vector, **args)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_forward_mode_and_the_double_vjp_fallback_agree(arch, monkeypatch) -> None:
    """The GGN quotients by forward-mode AD, and by the double-vjp trick where an operation
    has no forward-mode rule (simulated), are the same numbers."""
    import importlib

    T = importlib.import_module("torch_coherence.curvature.tracked_sharpness")

    model, loss, x, y = _case(arch, "ce", 6)
    model = nn.Sequential(nn.BatchNorm1d(x.shape[1]), *model).double()  # eval-mode BN
    model[0].running_mean.uniform_(-0.5, 0.5)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    forward = tracked_sharpness(model, loss, x, y, v)
    calls = []

    def no_rule(*args):
        calls.append(1)
        raise NotImplementedError("no forward AD formula")

    monkeypatch.setattr(T, "_forward_jvp", no_rule)
    fallback = tracked_sharpness(model, loss, x, y, v)
    assert calls and fallback.per_sample == pytest.approx(forward.per_sample, rel=1e-10)
    model.eval()
    u = v / v.norm()
    ref = torch.einsum("p,ipq,q->i", u, _dense(model, loss, x, y, "ggn"), u)
    assert forward.per_sample == pytest.approx(ref, rel=1e-9, abs=1e-12)
