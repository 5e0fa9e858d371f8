"""simulate_linearized_sgd against exact statistics and deterministic cases.

References: for diagonal curvature the coordinates of w multiply by their own factors
j_a = 1 - (eta/B) sum_{i in batch} D_ia, independent over time, so
E||w_k||^2 = sum_a E[w_0a^2] (E j_a^2)^k = (1/r) sum_a (E j_a^2)^k for a uniform unit start
(E[w_0 w_0^T] = I/r), with E j_a^2 enumerated over every batch (NumPy, no package code).
Deterministic cases: full batch is gradient descent, whose norm ratio in one dimension is
|1 - eta lambda|^k whatever the start.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from references import F64

from torch_coherence.dynamics import mean_square_rate
from torch_coherence.dynamics.simulate import simulate_linearized_sgd

SAMPLINGS = ("bernoulli", "without_replacement")


def exact_coordinate_second_moments(D: np.ndarray, lr: float, b: int, sampling: str):
    """E[j_a^2] for every coordinate a by enumerating all batches."""
    n = D.shape[0]
    out = np.zeros(D.shape[1])
    if sampling == "bernoulli":
        p = b / n
        for x in itertools.product((0, 1), repeat=n):
            prob = p ** sum(x) * (1 - p) ** (n - sum(x))
            out += prob * (1 - lr / b * np.array(x, float) @ D) ** 2
    else:
        subsets = list(itertools.combinations(range(n), b))
        for s in subsets:
            out += (1 - lr / b * D[list(s)].sum(0)) ** 2 / len(subsets)
    return out


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_mean_square_norm_matches_exact_second_moment(sampling):
    D = np.array([[2.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.5, 0.0, 2.0],
                  [0.0, 3.0, 0.0], [1.5, 0.5, 0.5]])  # fmt: skip
    lr, b, k, repeats = 0.45, 2, 8, 20000
    e2 = exact_coordinate_second_moments(D, lr, b, sampling)
    exact = float(np.mean(e2**k))
    res = simulate_linearized_sgd(
        torch.from_numpy(D), lr, b, steps=k, repeats=repeats, sampling=sampling,
        grow=1e300, shrink=1e300, seed=0, kind="diagonal",
    )  # fmt: skip
    sq = res.norms[:, k].numpy() ** 2
    assert np.isfinite(sq).all()
    se = sq.std(ddof=1) / math.sqrt(repeats)
    assert abs(sq.mean() - exact) <= 4.5 * se
    # the exact rate is the largest E j_a^2 (closed form of the operator)
    rho = mean_square_rate(torch.from_numpy(D), lr, b, sampling=sampling, kind="diagonal")
    assert rho == pytest.approx(e2.max(), rel=1e-12)


def test_dense_path_matches_exact_second_moment():
    """Non-diagonal curvature (coefficient-space path): E||w_1||^2 = tr(E[J^T J]) / d."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(5, 1, 3, generator=gen, dtype=F64)
    H = (A.transpose(1, 2) @ A).numpy()
    lr, b, repeats = 0.3, 2, 40000
    p = b / 5
    exact = 0.0
    for x in itertools.product((0, 1), repeat=5):
        prob = p ** sum(x) * (1 - p) ** (5 - sum(x))
        J = np.eye(3) - lr / b * np.tensordot(np.array(x, float), H, axes=1)
        exact += prob * np.trace(J.T @ J) / 3
    res = simulate_linearized_sgd(
        torch.from_numpy(H), lr, b, steps=1, repeats=repeats, grow=1e300, shrink=1e300, seed=1
    )
    sq = res.norms[:, 1].numpy() ** 2
    assert abs(sq.mean() - exact) <= 4.5 * sq.std(ddof=1) / math.sqrt(repeats)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_full_batch_is_gradient_descent_and_the_outcome_rule(sampling):
    D = torch.tensor([[1.0], [3.0]], dtype=F64)  # mean curvature 2
    for lr, want, step in [(1.5, "diverged", 10), (0.75, "converged", 10)]:
        # |1 - 2 eta| = 2 or 0.5: 2^10 = 1024 >= 1000 and 0.5^10 <= 1/1000 at step 10
        res = simulate_linearized_sgd(D, lr, 2, steps=50, repeats=3, sampling=sampling,
                                      seed=0, kind="diagonal")  # fmt: skip
        assert res.outcomes == (want,) * 3
        assert res.steps_taken == (step,) * 3
        assert res.label == want
        ratios = res.norms[0, 1 : step + 1].numpy()
        assert np.allclose(ratios, abs(1 - 2 * lr) ** np.arange(1, step + 1), rtol=1e-12)
        assert torch.isnan(res.norms[:, step + 1 :]).all()
    res = simulate_linearized_sgd(D, 1.0, 2, steps=30, repeats=2, sampling=sampling, seed=0,
                                  kind="diagonal")  # fmt: skip
    assert res.outcomes == ("undecided",) * 2  # |1 - 2| = 1: the norm never moves
    assert res.diverged_fraction == 0.0


def test_sam_full_batch_multiplier():
    D = torch.tensor([[1.0], [3.0]], dtype=F64)
    q, lr = 0.25, 0.2
    res = simulate_linearized_sgd(D, lr, 2, steps=5, repeats=1, optimizer="sam", sam_rho=q,
                                  grow=1e300, shrink=1e300, seed=0, kind="diagonal")  # fmt: skip
    mult = abs(1 - lr * 2 * (1 + q * 2))
    assert np.allclose(res.norms[0, 1:].numpy(), mult ** np.arange(1, 6), rtol=1e-12)


def test_without_replacement_draws_b_distinct_samples_uniformly():
    """One step in 1-D with curvatures (1, 10, 100): each pair gives its own multiplier."""
    D = torch.tensor([[1.0], [10.0], [100.0]], dtype=F64)
    lr, repeats = 0.01, 6000
    kw = dict(steps=1, repeats=repeats, grow=1e9, shrink=1e9, seed=4, kind="diagonal")
    res = simulate_linearized_sgd(D, lr, 2, sampling="without_replacement", **kw)
    got = res.norms[:, 1].numpy()
    pairs = [abs(1 - lr / 2 * (D[i, 0] + D[j, 0]).item()) for i, j in [(0, 1), (0, 2), (1, 2)]]
    which = np.argmin(np.abs(got[:, None] - np.array(pairs)[None, :]), axis=1)
    assert np.allclose(got, np.array(pairs)[which], rtol=1e-12)
    counts = np.bincount(which, minlength=3)
    expected = repeats / 3
    assert np.all(np.abs(counts - expected) <= 5 * math.sqrt(expected * 2 / 3))


def test_seed_reproducible_and_repeats_differ():
    D = torch.rand(10, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(steps=40, repeats=4, seed=11, kind="diagonal", grow=1e300, shrink=1e300)
    a = simulate_linearized_sgd(D, 0.9, 3, **kw)
    b = simulate_linearized_sgd(D, 0.9, 3, **kw)
    assert torch.equal(a.norms, b.norms)
    assert not torch.equal(a.norms[0], a.norms[1])
