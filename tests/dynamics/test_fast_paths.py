"""The fast paths against the slow ones: batched Monte Carlo against single calls, single
against double precision, the guarded search against a reference root finder, and the
eigenproblem form of the exact critical learning rate against enumerated operators."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from references import F64, random_factors, random_hessians, section51_hessians, top_eig
from scipy import optimize

from torch_coherence.dynamics import (
    critical_lr_exact,
    critical_lr_typical,
    lyapunov_exponent,
    mean_square_rate,
)
from torch_coherence.dynamics import lyapunov as lyap
from torch_coherence.dynamics.curvature_space import as_coefficient_curvature

SAMPLINGS = ("bernoulli", "without_replacement")


# --------------------------------------------------------- batched == one learning rate


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(("n", "momentum", "q"), [(None, 0.0, 0.0), (11, 0.0, 0.0),
                                                  (None, 0.6, 0.0), (None, 0.0, 0.5)])  # fmt: skip
def test_batched_learning_rates_equal_single_calls(sampling, n, momentum, q):
    H = random_hessians(3)
    lam = top_eig(H)
    lrs = [0.5 / lam, 1.7 / lam, 2.6 / lam]
    sam = dict(sam_rho=q) if q else {}
    kw = dict(sampling=sampling, momentum=momentum, steps=300, repeats=6, seed=5, **sam)
    prob = lyap._prepare(H, n, sampling, momentum, sam.get("sam_rho"), 1.0, "auto")
    batched = lyap._evaluate_many(prob, lrs, 2.0, 300, 6, 60, 5, "auto")
    for lr, est in zip(lrs, batched, strict=True):
        alone = lyapunov_exponent(H, lr, 2, n, **kw)
        assert not est.exact and est.method == "monte_carlo"
        assert est.value == pytest.approx(alone.value, abs=1e-6)
        assert est.stderr == pytest.approx(alone.stderr, rel=1e-3, abs=1e-7)
    # the search sees exactly these values (common random numbers, one batched run)
    assert len({e.value for e in batched}) == 3


def test_single_precision_propagation_matches_double(monkeypatch):
    H = random_hessians(7)
    lam = top_eig(H)
    for sampling, momentum in itertools.product(SAMPLINGS, (0.0, 0.5)):
        kw = dict(sampling=sampling, momentum=momentum, steps=800, repeats=8, seed=2)
        single = lyapunov_exponent(H, 1.9 / lam, 2, **kw)
        monkeypatch.setattr(lyap, "MC_DTYPE", torch.float64)
        double = lyapunov_exponent(H, 1.9 / lam, 2, **kw)
        monkeypatch.undo()
        # the same runs: the difference is rounding, orders below the standard error
        assert abs(single.value - double.value) < 1e-4 * single.stderr + 1e-6


def test_overflow_in_single_precision_falls_back_to_double(monkeypatch):
    """A learning rate so large that one step grows the state by far more than 1e38."""
    D = torch.tensor([[1.0, 0.1], [0.2, 2.0], [0.7, 1.3]], dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))
    H = Q @ torch.diag_embed(D) @ Q.T
    H[0] = H[0] + 0.3 * torch.outer(Q[:, 0] + Q[:, 1], Q[:, 0] + Q[:, 1])  # not commuting
    got = lyapunov_exponent(H, 1e25, 1, steps=200, repeats=4, seed=0)
    # a non-empty batch (probability 19/27) multiplies the norm by about 1e25
    assert not got.exact and math.isfinite(got.value) and got.value > 30
    monkeypatch.setattr(lyap, "MC_DTYPE", torch.float64)
    double = lyapunov_exponent(H, 1e25, 1, steps=200, repeats=4, seed=0)
    monkeypatch.undo()
    assert got.value == pytest.approx(double.value, rel=1e-12)
    prob = lyap._prepare(H, None, "bernoulli", 0.0, None, 1.0, "auto")
    apply = prob._apply_in(lyap.MC_DTYPE)
    runs = [lyap._monte_carlo_run(apply, 2, 3, 3, [1e25], 1.0, "bernoulli", 0.0, 200, 40, 4, 0,
                                  None, lyap.MC_DTYPE)]  # fmt: skip
    assert runs == [None]  # single precision overflowed: this is what fell back


# ------------------------------------------------------------- the typical critical lr


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_typical_critical_lr_against_brentq_on_single_calls(sampling):
    """The reference solves gamma_hat(eta) = 0 with brentq on one-rate calls (same seed)."""
    H = random_hessians(4)
    kw = dict(sampling=sampling, steps=400, repeats=6, seed=3)
    res = critical_lr_typical(H, 2, rel_tol=1e-3, band=False, **kw)
    assert res.lr_low == res.lr == res.lr_high

    def g(eta):
        return lyapunov_exponent(H, eta, 2, **kw).value

    lo, hi = res.lr * 0.97, res.lr * 1.03
    assert g(lo) < 0 < g(hi)
    ref = optimize.brentq(g, lo, hi, xtol=1e-9, rtol=1e-9)
    assert res.lr == pytest.approx(ref, rel=1e-3)
    banded = critical_lr_typical(H, 2, rel_tol=1e-3, **kw)
    assert banded.lr == pytest.approx(res.lr, rel=2e-3)
    assert banded.evaluations > res.evaluations


def test_typical_critical_lr_exact_path_and_far_roots():
    """Exact commuting case (scalar curvatures): roots far below and above eta_GD."""
    for h, b in [([1.0, 0.25, 0.25], 1), ([4.0] + [0.01] * 9, 1)]:
        D = torch.tensor(h, dtype=F64).unsqueeze(1)
        res = critical_lr_typical(D, b, kind="diagonal", rel_tol=1e-6, band=False)
        assert res.exact
        n = len(h)

        def g(eta, h=h, n=n, b=b):
            p = b / n
            return sum(  # Bernoulli, B = 1: enumerate every batch
                p ** sum(x)
                * (1 - p) ** (n - sum(x))
                * math.log(abs(1 - eta / b * float(np.dot(x, h))) or 1e-300)
                for x in itertools.product((0, 1), repeat=n)
            )

        assert g(res.lr * (1 - 1e-5)) < 0 < g(res.lr * (1 + 1e-5))


# ---------------------------------------------------------------- the exact critical lr


def enumerated_rate(H, lr, b, sampling, q=0.0, momentum=0.0):
    n, d, _ = H.shape
    T = 0.0
    if sampling == "bernoulli":
        p = b / n
        items = [(p ** sum(x) * (1 - p) ** (n - sum(x)), np.array(x, float))
                 for x in itertools.product((0, 1), repeat=n)]  # fmt: skip
    else:
        subs = list(itertools.combinations(range(n), b))
        items = [(1 / len(subs), np.isin(np.arange(n), s).astype(float)) for s in subs]
    P = np.eye(d) + q * H.mean(0)
    for prob, x in items:
        A = (1 + momentum) * np.eye(d) - lr * np.tensordot(x, H, axes=1) / b @ P
        if momentum:
            A = np.block([[A, -momentum * np.eye(d)], [np.eye(d), np.zeros((d, d))]])
        T = T + prob * np.kron(A, A)
    return float(np.abs(np.linalg.eigvals(T)).max())


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(("b", "q"), [(1, 0.0), (2, 0.0), (3, 0.4), (2, 1.5)])
def test_exact_critical_lr_eigenproblem_against_enumeration(sampling, b, q):
    H = random_hessians(11, n=5, C=2, d=3).numpy()
    sam = dict(sam_rho=q) if q else {}
    got = critical_lr_exact(torch.from_numpy(H), b, sampling=sampling, **sam)
    grid = np.geomspace(1e-3, 10.0, 400) / top_eig(H)
    vals = [enumerated_rate(H, e, b, sampling, q) - 1 for e in grid]
    k = next(i for i, v in enumerate(vals) if v >= 0)  # the first crossing
    want = optimize.brentq(lambda e: enumerated_rate(H, e, b, sampling, q) - 1, grid[k - 1],
                           grid[k], xtol=1e-14, rtol=1e-13)  # fmt: skip
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_critical_lr_large_factor_space_and_momentum(sampling):
    """r = 60 (the matrix-free eigenproblem) and momentum (bisection) solve rho(T) = 1."""
    gen = torch.Generator().manual_seed(1)
    A = random_factors(gen, 20, 3, 80)
    eta = critical_lr_exact(A, 4, 50, sampling=sampling, kind="factors", rel_tol=1e-9)
    kw = dict(sampling=sampling, kind="factors")
    assert mean_square_rate(A, eta * (1 - 1e-7), 4, 50, **kw) < 1
    assert mean_square_rate(A, eta * (1 + 1e-7), 4, 50, **kw) > 1
    H = random_hessians(5, n=6, C=1, d=3)  # state 2 r = 6: the dense rate
    eta = critical_lr_exact(H, 2, sampling=sampling, momentum=0.4, rel_tol=1e-6)
    assert mean_square_rate(H, eta * (1 - 2e-5), 2, sampling=sampling, momentum=0.4) < 1
    assert mean_square_rate(H, eta * (1 + 2e-5), 2, sampling=sampling, momentum=0.4) > 1


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_critical_lr_diagonal_closed_form(sampling):
    for n, s, b in [(20, 4, 3), (30, 1, 7), (12, 12, 5)]:
        H = section51_hessians(n, s)
        D = torch.diagonal(H, dim1=1, dim2=2)
        for data_n in (None, 2 * n + 1):
            got = critical_lr_exact(D, b, data_n, sampling=sampling, kind="diagonal")

            def f(e, D=D, b=b, data_n=data_n):
                return mean_square_rate(D, e, b, data_n, sampling=sampling, kind="diagonal") - 1

            assert abs(f(got)) < 1e-10
            assert f(got * 0.999) < 0 < f(got * 1.001)


def test_commutation_pretest_rejects_only_non_commuting_sets():
    H = section51_hessians(12, 3)
    Q, _ = torch.linalg.qr(
        torch.randn(10, 10, dtype=F64, generator=torch.Generator().manual_seed(4))
    )
    rotated = as_coefficient_curvature(Q @ H @ Q.T)
    G = rotated.factors
    m, c, r = G.shape
    assert not lyap._clearly_not_commuting(G.reshape(m * c, r), m, c, r)
    assert lyap._joint_diagonal(rotated) is not None
    generic = as_coefficient_curvature(random_hessians(2, n=6, C=2, d=5))
    G = generic.factors
    m, c, r = G.shape
    assert lyap._clearly_not_commuting(G.reshape(m * c, r), m, c, r)
    assert lyap._joint_diagonal(generic) is None
