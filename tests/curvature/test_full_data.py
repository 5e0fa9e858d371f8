"""Full-data sigma from a probe (MATH.md §6), validated on all 1797 sklearn digits.

Setting: a 64-8-1 tanh MLP trained briefly on "digit >= 5" with BCEWithLogitsLoss (C = 1,
so the exact 1797 x 1797 Gram is cheap). The exact sigma_n uses all n = 1797 samples; probes
of m = 256 random samples estimate it with the rescaled off-diagonal estimator of
:mod:`torch_coherence.curvature.measure`. Measured: sigma_n = 335.7; the probe's own sigma_m
is 43-54 (7x low), the estimates are 300-380 (within 11%); at m = 512, 329-359 (within 7%).
"""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from torch_coherence.curvature import measure_curvature


@pytest.fixture(scope="module")
def digits_problem():
    torch.manual_seed(0)
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float64) / 16
    Y = (torch.tensor(d.target) >= 5).double()[:, None]
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(100):
        opt.zero_grad()
        bce(model(X), Y).backward()
        opt.step()
    return model, X, Y, bce


def test_sigma_full_matches_exact_full_data_sigma(digits_problem):
    model, X, Y, bce = digits_problem
    n = X.shape[0]
    exact = measure_curvature(model, X, Y, bce, sharpness=None, eig_method="lanczos")
    assert exact.sigma_full is None and exact.n == n
    sigma_n = exact.stats.sigma
    errors, naive = [], []
    for seed in range(3):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:256]
        rep = measure_curvature(model, X[idx], Y[idx], bce, n=n, sharpness=None)
        assert rep.n == n
        errors.append(abs(rep.sigma_full - sigma_n) / sigma_n)
        naive.append(abs(rep.stats.sigma - sigma_n) / sigma_n)
    assert max(errors) < 0.2, errors
    assert sum(errors) / len(errors) < 0.12, errors
    assert min(naive) > 0.5  # the probe's own sigma is far off: the extrapolation matters
