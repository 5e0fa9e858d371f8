"""The probe never harms training: a plain loop with and without it is bit-identical."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from torch_coherence.probe import CoherenceProbe


def _data() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def _train(with_probe: bool, steps: int = 24) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (the global state the probe must leave alone)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    data = _data()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    probe = None
    if with_probe:
        probe = CoherenceProbe(
            loss=loss_fn,
            probe=loader,
            probe_size=16,
            dataset_size=len(data),
            every_n_steps=7,
            max_overhead=None,
            sharpness="both",
            # gamma and rho(T) work on the Gram alone, never on the model (and rho(T) with
            # momentum 0.9 costs tens of seconds here)
            lyapunov=False,
            criterion="theorem1",
        )
        probe.attach(opt)
        probe.start()
    done = 0
    while done < steps:
        for x, y in loader:
            if probe is not None and probe.due():
                probe.run(model, opt, 16, warn=lambda *_: None)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == 12:  # a schedule change: the lr trigger fires
                opt.param_groups[0]["lr"] = 1.5
            if probe is not None:
                probe.observe(loss.detach(), opt.param_groups[0]["lr"])
            if done == steps:
                break
    info = {"rng": torch.get_rng_state(), "py": random.getstate(), "np": np.random.get_state()}  # noqa: NPY002
    if probe is not None:
        probe.detach()
        info["history"] = probe.history
    return model, opt, info


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


@pytest.mark.filterwarnings("ignore")
def test_training_is_bit_identical_with_and_without_the_probe() -> None:
    plain, opt_a, a = _train(False)
    probed, opt_b, b = _train(True)
    kinds = [h["kind"] for h in b["history"]]
    assert kinds[0] == "preflight" and "triggered" in kinds and "scheduled" in kinds
    assert any("stability/blowup_lr" in h for h in b["history"])  # the real lookahead ran
    assert any("sharpness/hessian" in h for h in b["history"])  # HVPs on the model
    for p, q in zip(plain.parameters(), probed.parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(q))
        assert torch.equal(_bits(p.grad), _bits(q.grad))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert torch.equal(
            _bits(sa["state"][k]["momentum_buffer"]), _bits(sb["state"][k]["momentum_buffer"])
        )
    assert torch.equal(a["rng"], b["rng"]) and a["py"] == b["py"]
    assert all(np.array_equal(x, y) for x, y in zip(a["np"][1:2], b["np"][1:2], strict=True))
    assert plain.training and probed.training
