"""The one-eigenproblem forms of the exact critical values and the matrix-free momentum rate
against operators built here from every batch (NumPy Kronecker products of the sampled
Jacobians on (w_t, w_{t-1})), which share no code with :mod:`torch_coherence.dynamics`.

The enumerated operator needs an integer B; for the critical batch size (a real B) the
reference is the NumPy second-moment matrix built from the sampling formulas, itself checked
against the enumeration at every integer B first.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from references import hessians_from_factors, random_factors, random_hessians
from scipy import optimize

from torch_coherence.dynamics import (
    critical_batch_size_exact,
    critical_lr_exact,
    mean_square_rate,
)
from torch_coherence.dynamics import operator as op

SAMPLINGS = ("bernoulli", "without_replacement")


def jacobian(H, x, lr, b, beta, q):
    d = H.shape[1]
    P = np.eye(d) + q * H.mean(0)
    A = (1 + beta) * np.eye(d) - lr * np.tensordot(x, H, axes=1) / b @ P
    if beta == 0.0:
        return A
    return np.block([[A, -beta * np.eye(d)], [np.eye(d), np.zeros((d, d))]])


def enumerated_rate(H, lr, b, sampling, beta=0.0, q=0.0):
    n = H.shape[0]
    if sampling == "bernoulli":
        p = b / n
        items = [(p ** sum(x) * (1 - p) ** (n - sum(x)), np.array(x, float))
                 for x in itertools.product((0, 1), repeat=n)]  # fmt: skip
    else:
        subs = list(itertools.combinations(range(n), b))
        items = [(1 / len(subs), np.isin(np.arange(n), s).astype(float)) for s in subs]
    T = sum(p * np.kron(J, J) for p, J in ((p, jacobian(H, x, lr, b, beta, q)) for p, x in items))
    return float(np.abs(np.linalg.eigvals(T)).max())


def formula_rate(H, lr, b, sampling, beta=0.0, q=0.0):
    """rho(T) for a real B: E[J_hat (x) J_hat] = J (x) J + lr^2 E[D P (x) D P] on the
    (w_t, w_t) block, E[D X D] from the batch-indicator moments (Bernoulli: independent,
    variance p (1 - p); without replacement: hypergeometric pair probabilities)."""
    n, d, _ = H.shape
    P = np.eye(d) + q * H.mean(0)
    Hm = H.mean(0)
    if sampling == "bernoulli":
        p = b / n
        cov = p * (1 - p) * np.eye(n)
    else:
        p, pq = b / n, b * (b - 1) / (n * (n - 1))
        cov = np.full((n, n), pq - p * p)
        np.fill_diagonal(cov, p - p * p)
    HP = np.einsum("nij,jk->nik", H, P) / b
    noise = np.einsum("ij,iab,jcd->acbd", cov, HP, HP).reshape(d * d, d * d)
    J = (1 + beta) * np.eye(d) - lr * Hm @ P
    if beta:
        J = np.block([[J, -beta * np.eye(d)], [np.eye(d), np.zeros((d, d))]])
    T = np.kron(J, J)
    idx = np.arange(d)
    rows = (idx[:, None] * J.shape[0] + idx[None, :]).reshape(-1)  # (w_t, w_t) entries
    T[np.ix_(rows, rows)] += lr * lr * noise
    return float(np.abs(np.linalg.eigvals(T)).max())


def first_root(f, lo, hi, num=300):
    grid = np.geomspace(lo, hi, num)
    vals = [f(x) for x in grid]
    k = next(i for i, v in enumerate(vals) if v >= 0)
    assert k > 0, "the grid starts above the root"
    return optimize.brentq(f, grid[k - 1], grid[k], xtol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(("b", "beta", "q"), [(1, 0.5, 0.0), (2, 0.9, 0.0), (3, 0.3, 0.4),
                                              (2, 0.7, 1.5)])  # fmt: skip
def test_critical_lr_with_momentum_against_enumeration(sampling, b, beta, q):
    H = random_hessians(11).numpy()
    sam = dict(sam_rho=q) if q else {}
    got = critical_lr_exact(torch.from_numpy(H), b, sampling=sampling, momentum=beta, **sam)
    lam = float(np.linalg.eigvalsh(H.mean(0))[-1])
    want = first_root(lambda e: enumerated_rate(H, e, b, sampling, beta, q) - 1,
                      1e-3 / lam, 2 * (1 + beta) / lam)  # fmt: skip
    assert got == pytest.approx(want, rel=1e-8)


def test_formula_reference_is_the_enumeration_at_integer_batch_sizes():
    H = random_hessians(3, n=5).numpy()
    for sampling, b, beta, q in itertools.product(SAMPLINGS, (1, 2, 4), (0.0, 0.6), (0.0, 0.5)):
        want = enumerated_rate(H, 0.7, b, sampling, beta, q)
        assert formula_rate(H, 0.7, b, sampling, beta, q) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(("lr_scale", "beta", "q"), [(1.2, 0.0, 0.0), (0.9, 0.0, 0.5),
                                                     (2.0, 0.8, 0.0), (1.5, 0.5, 0.3)])  # fmt: skip
def test_critical_batch_size_against_formula_reference(sampling, lr_scale, beta, q):
    H = random_hessians(5, n=6).numpy()
    lr = lr_scale / float(np.linalg.eigvalsh(H.mean(0))[-1])
    sam = dict(sam_rho=q) if q else {}
    got = critical_batch_size_exact(torch.from_numpy(H), lr, sampling=sampling, momentum=beta,
                                    **sam)  # fmt: skip
    f = lambda bs: 1.0 - formula_rate(H, lr, bs, sampling, beta, q)  # noqa: E731
    assert f(1.0) < 0 < f(6.0), "the case must have a critical batch size inside [1, n]"
    want = optimize.brentq(f, 1.0, 6.0, xtol=1e-13, rtol=1e-12)
    assert got == pytest.approx(want, rel=1e-8)


def test_critical_batch_size_ends():
    H = random_hessians(5, n=6).numpy()
    lam = float(np.linalg.eigvalsh(H.mean(0))[-1])
    t = torch.from_numpy(H)
    assert critical_batch_size_exact(t, 2.5 / lam, momentum=0.0) == float("inf")  # GD unstable
    # momentum moves the full-batch limit to 2 (1 + beta) / lam = 3.8 / lam
    assert critical_batch_size_exact(t, 3.9 / lam, momentum=0.9) == float("inf")
    assert formula_rate(H, 3.7 / lam, 6.0, "bernoulli", 0.9) < 1
    assert critical_batch_size_exact(t, 3.7 / lam, momentum=0.9) < float("inf")
    assert critical_batch_size_exact(t, 1e-3 / lam) == 0.0
    assert formula_rate(H, 1e-3 / lam, 1.0, "bernoulli") < 1


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_matrix_free_momentum_rate_on_a_larger_space(sampling):
    """r = 12: the elementwise momentum operator against the dense Kronecker matrix."""
    gen = torch.Generator().manual_seed(2)
    A = random_factors(gen, 6, 2, 12)
    H = hessians_from_factors(A).numpy()
    lam = float(np.linalg.eigvalsh(H.mean(0))[-1])
    for lr, beta, q in [(0.5 / lam, 0.9, 0.0), (2.0 / lam, 0.5, 0.3), (3.5 / lam, 0.8, 0.0)]:
        kw = dict(sampling=sampling, momentum=beta, sam_rho=q or None)
        dense = mean_square_rate(A, lr, 3, 9, kind="factors", method="dense", **kw)
        free = mean_square_rate(A, lr, 3, 9, kind="factors", method="matrix_free", **kw)
        assert free == pytest.approx(dense, rel=1e-8)


def test_momentum_rate_never_builds_per_sample_jacobians(monkeypatch):
    """The matrix-free momentum path must not go through the dense operator parts."""

    def boom(*args, **kwargs):
        raise AssertionError("dense operator parts built")

    monkeypatch.setattr(op, "_operator_parts", boom)
    gen = torch.Generator().manual_seed(3)
    A = random_factors(gen, 8, 3, 40)
    rate = mean_square_rate(A, 0.05, 2, 20, kind="factors", momentum=0.9)
    assert 0 < rate < 2


def test_pivoted_cholesky_reduction_is_an_orthonormal_coefficient_space():
    """G_i from the pivoted Cholesky of K reproduce K, and h_i = Q^T H_i Q for an explicit
    orthonormal basis Q of V (so rho(T) and the Hessian spectra are those of the H_i)."""
    from torch_coherence.dynamics.curvature_space import as_coefficient_curvature

    gen = torch.Generator().manual_seed(8)
    A = random_factors(gen, 7, 3, 15).to(torch.float64)  # m C = 21 > d = 15: rank 15
    cc = as_coefficient_curvature(A, "factors")
    assert cc.rank == 15
    F = cc.factors.reshape(21, -1)
    K = A.reshape(21, 15) @ A.reshape(21, 15).T
    assert torch.allclose(F @ F.T, K, atol=1e-12)
    Q, _ = torch.linalg.qr(A.reshape(21, 15).T)  # orthonormal basis of V = R^15
    H = hessians_from_factors(A)
    spec_q = torch.linalg.eigvalsh(Q.T @ H.sum(0) @ Q)
    spec_c = torch.linalg.eigvalsh(cc.hessians().sum(0))
    assert torch.allclose(spec_q, spec_c, atol=1e-10)
    lam = float(torch.linalg.eigvalsh(H.mean(0))[-1])
    assert cc.top_eigenvalue() == pytest.approx(lam, rel=1e-12)
    big = as_coefficient_curvature(random_factors(gen, 30, 4, 100), "factors")  # Lanczos
    want = float(torch.linalg.eigvalsh(big.mean_hessian())[-1])
    assert big.top_eigenvalue() == pytest.approx(want, rel=1e-9)
    bad = K.clone()
    bad[0, 0] -= 5.0 * float(K.diagonal().max())
    with pytest.raises(ValueError, match="positive semidefinite"):
        as_coefficient_curvature(bad.reshape(7, 3, 7, 3), "gram")
    swap = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalue -1
    with pytest.raises(ValueError, match="positive semidefinite"):
        as_coefficient_curvature(swap, "gram")
    low_rank = (A[:, :, :4].reshape(21, 4) @ A[:, :, :4].reshape(21, 4).T).reshape(7, 3, 7, 3)
    assert as_coefficient_curvature(low_rank, "gram").rank == 4
