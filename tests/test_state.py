"""preserved_state: everything a probe may disturb comes back bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from torch_coherence._state import preserved_state


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(8, 3),
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def full_state(model: nn.Module) -> dict:
    """Every value preserved_state promises to keep, as independent copies."""
    return {
        "params": {k: bits(v) for k, v in model.named_parameters()},
        "buffers": {k: bits(v) for k, v in model.named_buffers()},
        "grads": {k: None if v.grad is None else bits(v.grad) for k, v in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),  # noqa: NPY002
        "python_rng": random.getstate(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same_state(a: dict, b: dict) -> None:
    for group in ("params", "buffers", "grads"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            x, y = a[group][k], b[group][k]
            if x is None or y is None:
                assert x is None and y is None, f"{group} {k}: None vs tensor"
            else:
                assert x.dtype == y.dtype and torch.equal(x, y), f"{group} {k} changed"
    assert a["training"] == b["training"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    na, nb = a["numpy_rng"], b["numpy_rng"]
    assert na[0] == nb[0] and np.array_equal(na[1], nb[1]) and na[2:] == nb[2:]
    assert a["python_rng"] == b["python_rng"]
    assert a["grad_enabled"] == b["grad_enabled"]


def trained(model: nn.Module) -> torch.optim.Optimizer:
    """Two SGD-momentum steps: momentum buffers exist, BN statistics moved, grads are set."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def disturb(model: nn.Module) -> None:
    """Everything a careless probe could do."""
    x = torch.randn(16, 6)
    torch.randn(100)
    np.random.rand(7)  # noqa: NPY002 (the legacy global generator is what is protected)
    random.random()
    model.train()
    out = model(x)  # batch statistics: running_mean/var and num_batches_tracked move
    out.square().mean().backward()  # accumulates into .grad
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # fresh grad tensors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[0].weight.data = torch.zeros_like(model[0].weight)  # rebinding .data
        model[4].bias.requires_grad_(False)
    model[3].training = True
    torch.set_grad_enabled(False)


def test_probe_mode_switches_to_eval_inside_and_restores_flags() -> None:
    model = make_model()
    model.train()
    model[3].eval()  # a mixed state must come back as it was, not as model.train()
    before = [m.training for m in model.modules()]
    with preserved_state(model) as m:
        assert m is model
        assert not any(mod.training for mod in model.modules())
    assert [m.training for m in model.modules()] == before
    with preserved_state(model, probe_mode=False):
        assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("grads", ["none", "set", "mixed"])
def test_everything_restored_bit_identical(grads: str) -> None:
    model = make_model()
    trained(model)
    if grads == "none":
        model.zero_grad(set_to_none=True)
    elif grads == "mixed":
        model[4].bias.grad = None
    param_objects = [p for p in model.parameters()]
    storages = [p.data_ptr() for p in model.parameters()]
    grad_objects = [p.grad for p in model.parameters()]
    before = full_state(model)
    with preserved_state(model):
        disturb(model)
    assert_same_state(full_state(model), before)
    # the same objects: optimizer references and grad views stay valid
    assert all(p is q for p, q in zip(model.parameters(), param_objects, strict=True))
    assert all(p.grad is g for p, g in zip(model.parameters(), grad_objects, strict=True))
    assert [p.data_ptr() for p in model.parameters()] == storages  # no reallocation


def test_restored_on_exception() -> None:
    model = make_model()
    trained(model)
    before = full_state(model)
    with pytest.raises(RuntimeError, match="probe failed"), preserved_state(model):
        disturb(model)
        raise RuntimeError("probe failed")
    assert_same_state(full_state(model), before)


def test_training_continues_identically_with_momentum_optimizer() -> None:
    """A run with a probe between steps ends bit-identical to a run without one."""

    def run(probe: bool) -> tuple[dict, dict]:
        model = make_model()
        opt = trained(model)
        if probe:
            state_before = {k: bits(v["momentum_buffer"]) for k, v in opt.state.items()}
            with preserved_state(model):
                disturb(model)
            for k, v in opt.state.items():  # the optimizer state is not touched
                assert torch.equal(v["momentum_buffer"], state_before[k])
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            opt.zero_grad()
            x = torch.randn(16, 6, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            nn.functional.cross_entropy(model(x), y).backward()  # dropout draws global RNG
            opt.step()
        return full_state(model), {
            i: bits(s["momentum_buffer"]) for i, s in enumerate(opt.state.values())
        }

    (state_a, opt_a), (state_b, opt_b) = run(False), run(True)
    assert_same_state(state_a, state_b)
    assert all(torch.equal(opt_a[i], opt_b[i]) for i in opt_a)


def test_unchanged_tensors_are_not_written() -> None:
    """No version-counter bump: a graph built before the probe can still be back-propagated."""
    model = make_model()
    model.eval()
    x = torch.randn(4, 6)
    loss = model(x).square().sum()
    versions = [p._version for p in model.parameters()]
    with preserved_state(model):
        model(x).sum().backward()
    assert [p._version for p in model.parameters()] == versions
    loss.backward()  # would raise if a saved parameter had been modified in place


def test_negative_zero_and_nan_restored_bitwise() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, float("nan")]]))
    before = model.weight.detach().clone().view(torch.int32)
    with preserved_state(model), torch.no_grad():
        model.weight.copy_(torch.tensor([[-0.0, float("nan")]]))
    assert torch.equal(model.weight.detach().view(torch.int32), before)


def test_registered_tensors_rebound_inside_are_put_back() -> None:
    model = make_model()
    bn = model[1]
    mean, weight = bn.running_mean, bn.weight
    with preserved_state(model):
        bn.running_mean = torch.ones(8)
        bn.weight = nn.Parameter(torch.ones(8))
        bn.register_buffer("extra", torch.zeros(1))
    assert bn.running_mean is mean and bn.weight is weight
    assert "extra" not in dict(bn.named_buffers())


def test_rejects_non_module() -> None:
    with (
        pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"),
        preserved_state(
            torch.zeros(2)  # type: ignore[arg-type]
        ),
    ):
        pass
