"""rho(T) of the second-moment operator against independent references.

References used here share no code with :mod:`torch_coherence.dynamics`: explicit
enumeration of every batch (NumPy Kronecker products of the sampled Jacobians), Monte-Carlo
products of sampled Jacobians, the closed form of the paper's Section 5.1 construction and
the heavy-ball companion-matrix eigenvalues of gradient descent.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from references import F64, hessians_from_factors, random_factors, section51_hessians

import torch_coherence as tc
from torch_coherence.dynamics import (
    as_coefficient_curvature,
    critical_batch_size_exact,
    critical_lr_exact,
    mean_square_rate,
)

SAMPLINGS = ("bernoulli", "without_replacement")


# ------------------------------------------------------------------ enumeration reference


def batches(n: int, batch_size: int, sampling: str):
    """Every batch as (probability, indicator vector)."""
    if sampling == "bernoulli":
        p = batch_size / n
        for x in itertools.product((0, 1), repeat=n):
            k = sum(x)
            yield p**k * (1 - p) ** (n - k), np.array(x, float)
    else:
        subsets = list(itertools.combinations(range(n), batch_size))
        for s in subsets:
            x = np.zeros(n)
            x[list(s)] = 1.0
            yield 1.0 / len(subsets), x


def step_matrix(H, x, lr, batch_size, momentum=0.0, sam_q=0.0):
    """The sampled Jacobian of one step (on (w_t, w_{t-1}) with momentum)."""
    d = H.shape[1]
    Hhat = np.tensordot(x, H, axes=1) / batch_size
    P = np.eye(d) + sam_q * H.mean(0)
    A = (1 + momentum) * np.eye(d) - lr * Hhat @ P
    if momentum == 0.0:
        return A
    return np.block([[A, -momentum * np.eye(d)], [np.eye(d), np.zeros((d, d))]])


def enumerated_operator(H, lr, batch_size, sampling, momentum=0.0, sam_q=0.0):
    """E[J_hat (x) J_hat] summed over every batch."""
    T = 0.0
    for prob, x in batches(H.shape[0], batch_size, sampling):
        J = step_matrix(H, x, lr, batch_size, momentum, sam_q)
        T = T + prob * np.kron(J, J)
    return T


def spectral_radius(T: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(T)).max())


def full_rank_hessians(seed: int, n: int = 5, C: int = 2, d: int = 3) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return hessians_from_factors(random_factors(gen, n, C, d)).numpy()


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(
    ("lr", "batch_size", "momentum", "sam_q"),
    [(0.3, 1, 0.0, 0.0), (0.2, 2, 0.0, 0.0), (0.6, 3, 0.0, 0.0), (0.2, 2, 0.6, 0.0),
     (0.4, 1, 0.3, 0.0), (0.2, 2, 0.0, 0.5), (0.3, 2, 0.5, 0.4)],
)  # fmt: skip
def test_rate_matches_enumeration_of_all_batches(sampling, lr, batch_size, momentum, sam_q):
    H = full_rank_hessians(7)
    lam = np.linalg.eigvalsh(H.mean(0))[-1]
    lr = lr / lam * 2  # scale into the interesting range around rho = 1
    ref = spectral_radius(enumerated_operator(H, lr, batch_size, sampling, momentum, sam_q))
    sam = dict(sam_rho=sam_q, sam_alpha=1.0) if sam_q else {}
    for method in ("dense", "matrix_free"):
        got = mean_square_rate(
            torch.from_numpy(H), lr, batch_size, sampling=sampling, momentum=momentum,
            method=method, **sam,
        )  # fmt: skip
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-9), method


def test_enumeration_covers_both_sides_of_one():
    """The enumeration cases above are not all stable (a test that cannot fail is useless)."""
    H = full_rank_hessians(7)
    lam = np.linalg.eigvalsh(H.mean(0))[-1]
    rates = [
        spectral_radius(enumerated_operator(H, 2 * lr / lam, b, "bernoulli"))
        for lr, b in [(0.3, 1), (0.6, 3), (0.2, 2)]
    ]
    assert min(rates) < 1 < max(rates)


# ------------------------------------------------------------------ Monte-Carlo reference


def monte_carlo_frobenius(H, lr, batch_size, sampling, steps, paths, seed):
    """Samples of ||J_k ... J_1||_F^2 from sampled batches (vectorised over paths)."""
    gen = torch.Generator().manual_seed(seed)
    Ht = torch.from_numpy(H)
    n, d, _ = Ht.shape
    prod = torch.eye(d, dtype=F64).expand(paths, d, d).clone()
    for _ in range(steps):
        if sampling == "bernoulli":
            x = (torch.rand(paths, n, generator=gen, dtype=F64) < batch_size / n).to(F64)
        else:
            idx = torch.rand(paths, n, generator=gen).argsort(1)[:, :batch_size]
            x = torch.zeros(paths, n, dtype=F64).scatter_(1, idx, 1.0)
        J = torch.eye(d, dtype=F64) - lr / batch_size * torch.einsum("pn,nde->pde", x, Ht)
        prod = J @ prod
    return (prod**2).sum((1, 2)).numpy()


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_rate_brackets_monte_carlo_second_moment(sampling):
    """rho^k <= E||J_k...J_1||_F^2 <= r rho^k for even k (T self-adjoint, PSD Perron vector).

    With T(M) = E[J M J] self-adjoint and M_0 = I: tr T^k(I) = sum_j lambda_j^k <I, E_j>^2,
    every term >= 0 for even k, sum_j <I, E_j>^2 = ||I||_F^2 = r and the Perron
    eigenmatrix E_1 is PSD with <I, E_1> = tr E_1 >= ||E_1||_F = 1. The Monte-Carlo mean
    must fall in the bracket up to 4 standard errors, and match the exact enumerated
    tr T^k(I) within 4 standard errors.
    """
    H = full_rank_hessians(11, n=6, C=1, d=3)
    r, k, paths = 3, 12, 40000
    lam = np.linalg.eigvalsh(H.mean(0))[-1]
    for lr in (0.7 / lam, 1.02 / lam):
        rho = mean_square_rate(torch.from_numpy(H), lr, 2, sampling=sampling)
        samples = monte_carlo_frobenius(H, lr, 2, sampling, k, paths, seed=3)
        mean, se = samples.mean(), samples.std(ddof=1) / math.sqrt(paths)
        assert rho**k <= mean + 4 * se
        assert mean - 4 * se <= r * rho**k
        T = enumerated_operator(H, lr, 2, sampling)
        exact = float(np.linalg.matrix_power(T, k) @ np.eye(r).reshape(-1) @ np.eye(r).reshape(-1))
        assert abs(mean - exact) <= 4 * se
    # a wrong rate by 10% leaves the bracket: the bracket is informative at this k
    assert 1.1**k > r


# ----------------------------------------------------------------- Section 5.1 closed form


def section51_rate(n, s, lr, batch_size, sampling):
    """Closed form: max over coordinate groups of E[j^2] (paper 000, proof of Theorem 2).

    Coordinate 1: j = 1 - (eta m / B) X with X the number of the s coherent samples in the
    batch (binomial or hypergeometric); the other coordinates: j = 1 - (eta m / B) x.
    """
    m = 2.0 * n / s
    p = batch_size / n
    mean_x = s * p
    if sampling == "bernoulli":
        var_x = s * p * (1 - p)
    else:
        var_x = s * p * (1 - p) * (n - s) / (n - 1) if n > 1 else 0.0
    c = lr * m / batch_size
    first = 1 - 2 * c * mean_x + c * c * (var_x + mean_x**2)
    if s == n:
        return first
    other = 1 - 2 * c * p + c * c * p
    return max(first, other)


def test_section51_paper_expression_for_coordinate_one():
    """Proof of Theorem 2: e1^T E[J^2] e1 = 1 - 2 eta s m/n + eta^2 s^2 m^2/n^2 + (...) s m^2."""
    n, s, lr, b = 100, 5, 0.5, 10
    m = 2 * n / s
    paper = (
        1 - 2 * lr * s / n * m + lr**2 * s**2 / n**2 * m**2
        + (lr**2 / (n * b) - lr**2 / n**2) * s * m**2
    )  # fmt: skip
    p = b / n
    c = lr * m / b
    assert paper == pytest.approx(1 - 2 * c * s * p + c * c * (s * p * (1 - p) + (s * p) ** 2))


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(("n", "s"), [(8, 1), (8, 3), (8, 8), (100, 5), (100, 40)])
def test_section51_closed_form(sampling, n, s):
    H = section51_hessians(n, s)
    for lr, b in [(0.8, 1), (0.5, 3), (0.3, 7), (1.0, 8)]:
        want = section51_rate(n, s, lr, b, sampling)
        assert mean_square_rate(H, lr, b, sampling=sampling) == pytest.approx(want, rel=1e-12)
        if n <= 8:  # the assembled operator agrees with the closed form
            got = mean_square_rate(H, lr, b, sampling=sampling, method="dense")
            assert got == pytest.approx(want, rel=1e-10)


def test_theorem2_line_is_the_exact_bernoulli_boundary_of_section51():
    n = 100
    sigma_grid = [1, 2, 3, 5, 10, 20, 50, 99, 100]
    flips = 0
    for s in sigma_grid:
        H = as_coefficient_curvature(section51_hessians(n, s))  # reduce once
        for lr in (0.2, 0.5, 0.8, 1.0):
            for b in (1, 2, 5, 10, 30, 60, 100):
                rho = mean_square_rate(H, lr, b, sampling="bernoulli")
                bound = tc.theorem2_bound(s, lr, b, n)
                # lambda_1(H) = 2: rho <= 1 iff 2 <= bound (equality at the line)
                if abs(bound - 2) > 1e-9:
                    assert (rho < 1) == (2 < bound), (s, lr, b, rho, bound)
                    flips += rho > 1
    assert flips > 0


# --------------------------------------------------------------------- Theorem 1 implies rho > 1


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_theorem1_condition_implies_rate_above_one(sampling):
    gen = torch.Generator().manual_seed(5)
    hits = 0
    for trial in range(12):
        n, C, d = 6, 1 + trial % 2, 2 + trial % 3
        H = hessians_from_factors(random_factors(gen, n, C, d))
        if trial % 4 == 0:  # strongly aligned sets too
            v = torch.randn(d, 1, generator=gen, dtype=F64)
            H = H + (torch.rand(n, 1, 1, generator=gen, dtype=F64) * 3) * (v @ v.T)
        stats = tc.coherence_from_hessians(H)
        for lr in np.geomspace(0.05, 3.0, 9) / stats.sharpness:
            for b in range(1, n + 1):
                t1 = tc.theorem1_threshold(stats.sigma, lr, b, n)
                if stats.sharpness > min(t1, 2 / lr) * (1 + 1e-9):
                    hits += 1
                    assert mean_square_rate(H, lr, b, sampling=sampling) > 1
    assert hits > 20


# ------------------------------------------------------------ representations agree


def test_factor_gram_and_dense_spaces_agree():
    gen = torch.Generator().manual_seed(9)
    # rank 6 < d = 8: the coefficient space is smaller than the parameter space
    A = random_factors(gen, 3, 2, 8)
    H = hessians_from_factors(A)
    K = torch.einsum("icd,jed->icje", A, A)
    above = 0
    cases = [(0.2, 1, "bernoulli"), (0.5, 2, "without_replacement"), (0.9, 1, "bernoulli"),
             (0.9, 1, "without_replacement")]  # fmt: skip
    for lr, b, sampling in cases:
        lam = float(torch.linalg.eigvalsh(H.mean(0))[-1])
        lr = lr * 2 / lam
        rates = [
            mean_square_rate(X, lr, b, sampling=sampling, method=meth)
            for X in (H, A, K)
            for meth in ("dense", "matrix_free")
        ]
        # reference 1: the enumerated operator on the range V of the H_i (orthonormal basis
        # from NumPy's eigh of sum_i H_i)
        w, U = np.linalg.eigh(H.numpy().sum(0))
        Q = U[:, w > 1e-10 * w.max()]
        Hv = np.einsum("da,nde,eb->nab", Q, H.numpy(), Q)
        ref = spectral_radius(enumerated_operator(Hv, lr, b, sampling))
        # reference 2: on all of R^(d x d) the extra eigenvalues are 1 (flat directions) and
        # those of E[J_hat] (mixed blocks, <= sqrt(rho)); above 1 the maximum is rho itself
        full = spectral_radius(enumerated_operator(H.numpy(), lr, b, sampling))
        if ref > 1:
            assert full == pytest.approx(ref, rel=1e-10)
            above += 1
        for got in rates:
            assert got == pytest.approx(ref, rel=1e-10, abs=1e-10)
    assert above > 0


def test_large_d_factor_space_matrix_free():
    """d = 5000 parameters, m C = 16 coefficients: no d x d matrix is needed."""
    gen = torch.Generator().manual_seed(2)
    A = random_factors(gen, 8, 2, 5000)
    K = torch.einsum("icd,jed->icje", A, A)
    lam = float(torch.linalg.eigvalsh(K.reshape(16, 16))[-1]) / 8
    r1 = mean_square_rate(A, 1.0 / lam, 2, n=50, method="matrix_free")
    r2 = mean_square_rate(K, 1.0 / lam, 2, n=50, method="dense")
    assert r1 == pytest.approx(r2, rel=1e-10)


def test_probe_standing_for_larger_dataset_uses_n_in_noise_coefficient():
    """mean over the probe, (1/B - 1/n) with the data-set n (docs/theory.md §5)."""
    D = torch.tensor([[1.0], [0.25], [0.25]], dtype=F64)
    n, b, lr = 30, 2, 1.5
    mean, sq = float(D.mean()), float((D**2).mean())
    want = (1 - lr * mean) ** 2 + lr**2 * (1 / b - 1 / n) * sq
    assert mean_square_rate(D, lr, b, n, kind="diagonal") == pytest.approx(want, rel=1e-14)
    c = (n - b) / (b * (n - 1))
    want_wor = (1 - lr * mean) ** 2 + lr**2 * c * (sq - mean**2)
    got = mean_square_rate(D, lr, b, n, kind="diagonal", sampling="without_replacement")
    assert got == pytest.approx(want_wor, rel=1e-14)


def test_first_moment_counterexample_has_rate_above_one():
    """docs/theory.md §4: n = 3, curvatures (1, 1/4, 1/4), B = 1, eta = 2.25: E j^2 = 1.28125."""
    D = torch.tensor([[1.0], [0.25], [0.25]], dtype=F64)
    assert mean_square_rate(D, 2.25, 1, kind="diagonal") == pytest.approx(1.28125, rel=1e-14)
    H = torch.diag_embed(D)
    assert mean_square_rate(H, 2.25, 1, method="dense") == pytest.approx(1.28125, rel=1e-12)


# -------------------------------------------------------------- full batch: GD limits


def heavy_ball_gd_rate(eigs, lr, beta):
    """max over curvatures of |mu|^2, mu the roots of mu^2 - (1 + beta - eta lam) mu + beta."""
    worst = 0.0
    for lam in eigs:
        roots = np.roots([1.0, -(1 + beta - lr * lam), beta])
        worst = max(worst, float(np.abs(roots).max()) ** 2)
    return worst


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_momentum_reduces_to_gradient_descent_at_full_batch(sampling, beta):
    H = torch.from_numpy(full_rank_hessians(4, n=5, C=1, d=3))
    eigs = np.linalg.eigvalsh(H.mean(0).numpy())
    for lr in (0.5 / eigs[-1], 2.0 / eigs[-1], 3.5 / eigs[-1]):
        want = heavy_ball_gd_rate(eigs, lr, beta)
        for method in ("dense", "matrix_free"):
            got = mean_square_rate(H, lr, 5, sampling=sampling, momentum=beta, method=method)
            assert got == pytest.approx(want, rel=1e-8)
    eta_c = critical_lr_exact(H, 5, sampling=sampling, momentum=beta)
    assert eta_c == pytest.approx(2 * (1 + beta) / eigs[-1], rel=1e-8)


def test_sam_full_batch_critical_lr_is_gd_threshold():
    H = torch.from_numpy(full_rank_hessians(4, n=5, C=1, d=3))
    lam = float(np.linalg.eigvalsh(H.mean(0).numpy())[-1])
    eta_c = critical_lr_exact(H, 5, sam_rho=0.3, sam_alpha=1.0)
    # GD with SAM is stable iff lam (1 + q lam) < 2 / eta
    assert lam == pytest.approx(tc.gd_threshold(eta_c, sam_rho=0.3), rel=1e-8)


# ------------------------------------------------------------------- critical values


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_critical_values_solve_rate_equals_one(sampling):
    H = torch.from_numpy(full_rank_hessians(8, n=6, C=2, d=4))
    eta_c = critical_lr_exact(H, 2, sampling=sampling)
    assert mean_square_rate(H, eta_c, 2, sampling=sampling) == pytest.approx(1.0, abs=1e-8)
    assert mean_square_rate(H, eta_c * 1.01, 2, sampling=sampling) > 1
    assert mean_square_rate(H, eta_c * 0.99, 2, sampling=sampling) < 1
    b_c = critical_batch_size_exact(H, eta_c * 1.3, sampling=sampling)
    assert 1 < b_c < 6
    assert mean_square_rate(H, eta_c * 1.3, b_c, sampling=sampling) == pytest.approx(1, abs=1e-8)
    assert critical_batch_size_exact(H, eta_c * 0.5, sampling=sampling) == 0.0
    lam = float(torch.linalg.eigvalsh(H.mean(0))[-1])
    assert critical_batch_size_exact(H, 2.2 / lam, sampling=sampling) == math.inf


def test_critical_lr_is_between_the_theorems_for_section51():
    """Exact eta_c of §5.1 (Bernoulli) equals the Theorem 2 line solved for eta."""
    n, s, b = 100, 5, 10
    H = section51_hessians(n, s)
    eta_c = critical_lr_exact(H, b)
    # 2 = 2 s / (eta (s + n/B - 1))  <=>  eta = s / (s + n/B - 1)
    assert eta_c == pytest.approx(s / (s + n / b - 1), rel=1e-9)
    assert eta_c <= tc.critical_lr(2.0, s, b, n) + 1e-12


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr="x"), TypeError, "lr"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=7), ValueError, "batch_size"),
        (dict(n=3), ValueError, "n must be >="),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(sampling="poisson"), ValueError, "sampling"),
        (dict(method="qr"), ValueError, "method"),
        (dict(kind="tensor"), ValueError, "kind"),
        (dict(sam_rho=-1.0), ValueError, "sam_rho"),
        (dict(sam_rho=0.1, sam_alpha=0.0), ValueError, "sam_alpha"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    H = torch.from_numpy(full_rank_hessians(1, n=4, C=1, d=2))
    args = dict(curvature=H, lr=0.1, batch_size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        mean_square_rate(**args)


@pytest.mark.parametrize(
    ("curvature", "kind", "match"),
    [
        (torch.zeros(3, 4, dtype=F64), "auto", "ambiguous"),
        (torch.zeros(2, 3, 2, 4, dtype=F64), "auto", "gram"),
        (torch.tensor([[[1.0, 2.0], [0.0, 1.0]]], dtype=F64), "hessians", "symmetric"),
        (-torch.eye(2, dtype=F64).unsqueeze(0), "hessians", "positive semidefinite"),
        (torch.tensor([[1.0, float("nan")]], dtype=F64), "diagonal", "NaN"),
    ],
)
def test_bad_curvature(curvature, kind, match):
    with pytest.raises(ValueError, match=match):
        mean_square_rate(curvature, 0.1, 1, kind=kind)


def test_zero_curvature_is_neutral():
    assert mean_square_rate(torch.zeros(3, 2, 2, dtype=F64), 0.5, 1) == 1.0
