"""Fixtures of the integration tests; models and data are in ``helpers.py``."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from torch_coherence.coherence import coherence_from_factors


@pytest.fixture
def quiet_lightning(monkeypatch):
    """Silence Lightning's informational output."""
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


@pytest.fixture(autouse=True)
def _engine_until_landed(monkeypatch):
    """TEMPORARY: use a stand-in engine while torch_coherence.curvature is missing."""
    try:
        import torch_coherence.curvature  # noqa: F401
    except ImportError:
        monkeypatch.setattr("torch_coherence.probe._default_engine", fake_measure_curvature)
    yield


# TEMPORARY stand-in engine (exact softmax-CE GGN factors via torch.func).


def fake_measure_curvature(model, inputs, targets, loss, *, n=None, **kwargs):
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(p, x):
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, inputs)
    J = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)
    with torch.no_grad():
        p = torch.softmax(functional_call(model, (params, buffers), (inputs,)), dim=1).double()
    sq = p.sqrt()
    Bm = torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)  # B = diag(sqrt p) - p sqrt(p)^T
    A = Bm.transpose(1, 2) @ J.double()
    model.train(was)
    stats = coherence_from_factors(A)
    return SimpleNamespace(
        stats=stats,
        hessian_sharpness=None,
        ggn_sharpness=stats.sharpness,
        gradient_noise_scale=1.0,
        seconds=time.perf_counter() - t0,
    )
