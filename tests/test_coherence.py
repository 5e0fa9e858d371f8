"""The coherence measure against closed forms and a brute-force matrix-square-root reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from references import (
    F64,
    hessians_from_factors,
    random_factors,
    reference_coherence,
    section51_hessians,
)

import torch_coherence as tc
from torch_coherence import linalg

ENTRY_POINTS = ("hessians", "factors", "gram")


def stats_via(entry: str, factors: torch.Tensor, **kw) -> tc.CoherenceStats:
    """Coherence of H_i = A_i^T A_i through one of the three entry points."""
    if entry == "hessians":
        return tc.coherence_from_hessians(hessians_from_factors(factors), **kw)
    if entry == "factors":
        return tc.coherence_from_factors(factors, **kw)
    n, C, d = factors.shape
    A = factors.reshape(n * C, d)
    return tc.coherence_from_gram((A @ A.T).reshape(n, C, n, C), **kw)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("n", "d"), [(1, 1), (5, 3), (40, 7)])
def test_identical_rank_one_gives_sigma_n(entry: str, n: int, d: int, gen) -> None:
    # S is the constant matrix ||v||^2 11^T whose top eigenvalue is n ||v||^2 (not sqrt(n)).
    v = torch.randn(1, 1, d, generator=gen, dtype=F64)
    stats = stats_via(entry, v.expand(n, 1, d).clone())
    assert stats.sigma == pytest.approx(n, rel=1e-12)
    assert stats.max_sample_sharpness == pytest.approx(float(v.square().sum()), rel=1e-12)
    assert stats.sharpness == pytest.approx(float(v.square().sum()), rel=1e-12)
    assert stats.n == n


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_orthogonal_equal_norm_gives_sigma_one(entry: str, gen) -> None:
    n, scale = 6, 3.5
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    factors = math.sqrt(scale) * Q.unsqueeze(1)  # A_i = sqrt(c) q_i^T, mutually orthogonal
    stats = stats_via(entry, factors)
    # From dense H_i, tr(H_i H_j) = 0 is known only to ~eps ||H||^2, so S_ij = sqrt(.) only to
    # ~sqrt(eps) ||H||: the problem's own conditioning (see coherence_from_hessians). Factors
    # and Gram carry the orthogonality exactly.
    rel = 1e-7 if entry == "hessians" else 1e-12
    assert stats.sigma == pytest.approx(1.0, rel=rel)
    assert stats.max_sample_sharpness == pytest.approx(scale, rel=1e-12)
    assert stats.sharpness == pytest.approx(scale / n, rel=1e-12)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("n", "d"), [(3, 1), (4, 5), (10, 9)])
def test_identity_hessians_give_n_sqrt_d(entry: str, n: int, d: int) -> None:
    factors = torch.eye(d, dtype=F64).expand(n, d, d).clone()
    stats = stats_via(entry, factors)
    assert stats.sigma == pytest.approx(n * math.sqrt(d), rel=1e-12)
    assert stats.sharpness == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(("n", "s"), [(10, 1), (10, 3), (20, 7), (100, 5), (100, 100)])
def test_section51_construction(n: int, s: int) -> None:
    stats = tc.coherence_from_hessians(section51_hessians(n, s))
    assert stats.sigma == pytest.approx(s, rel=1e-12)
    assert stats.sharpness == pytest.approx(2.0, rel=1e-12)
    assert stats.max_sample_sharpness == pytest.approx(2.0 * n / s, rel=1e-12)


@pytest.mark.parametrize(("n", "s", "lam"), [(10, 4, 0.7), (25, 25, 3.0), (8, 1, 1.0)])
def test_theorem2_construction(n: int, s: int, lam: float) -> None:
    # Proof of Theorem 2: H_i = m e_1 e_1^T for i <= sigma, 0 otherwise, m = lambda_1 n / sigma.
    m = lam * n / s
    H = torch.zeros(n, 3, 3, dtype=F64)
    H[:s, 0, 0] = m
    stats = tc.coherence_from_hessians(H)
    assert stats.sigma == pytest.approx(s, rel=1e-12)
    assert stats.sharpness == pytest.approx(lam, rel=1e-12)
    assert stats.lambda_S == pytest.approx(m * s, rel=1e-12)


# --------------------------------------------------------------- random sets vs reference


CASES = [
    pytest.param(12, 1, 6, id="rank-one"),
    pytest.param(9, 3, 8, id="low-rank-C3"),
    pytest.param(7, 10, 12, id="low-rank-C10"),
    pytest.param(6, 10, 5, id="full-rank"),
]


@pytest.mark.parametrize(("n", "C", "d"), CASES)
def test_matches_matrix_square_root_reference(n: int, C: int, d: int, gen) -> None:
    factors = random_factors(gen, n, C, d)
    H = hessians_from_factors(factors)
    ref = reference_coherence(H.numpy())
    stats = tc.coherence_from_hessians(H)
    np.testing.assert_allclose(stats.S.numpy(), ref.S, rtol=1e-10, atol=1e-12)
    assert stats.sigma == pytest.approx(ref.sigma, rel=1e-10)
    assert stats.lambda_S == pytest.approx(ref.lambda_S, rel=1e-10)
    assert stats.max_sample_sharpness == pytest.approx(ref.max_sample_sharpness, rel=1e-10)
    assert stats.sharpness == pytest.approx(ref.sharpness, rel=1e-10)
    assert stats.sigma >= 1.0


@pytest.mark.parametrize(("n", "C", "d"), CASES)
def test_three_entry_points_agree(n: int, C: int, d: int, gen) -> None:
    factors = random_factors(gen, n, C, d)
    results = [stats_via(e, factors) for e in ENTRY_POINTS]
    for other in results[1:]:
        torch.testing.assert_close(other.S, results[0].S, rtol=1e-10, atol=1e-12)
        for field in ("sigma", "lambda_S", "max_sample_sharpness", "sharpness"):
            assert getattr(other, field) == pytest.approx(getattr(results[0], field), rel=1e-10)


def test_gram_of_shape_n_by_n_for_scalar_outputs(gen) -> None:
    factors = random_factors(gen, 15, 1, 4)
    A = factors[:, 0, :]
    a = tc.coherence_from_gram(A @ A.T)
    b = tc.coherence_from_factors(factors)
    assert a.sigma == pytest.approx(b.sigma, rel=1e-12)
    # C = 1: S is the entrywise absolute value of K (docs/theory.md §3)
    torch.testing.assert_close(a.S, (A @ A.T).abs())


# ------------------------------------------------------------------------------ invariances


def test_invariant_to_permutation_scaling_and_rotation(gen) -> None:
    n, C, d = 10, 3, 7
    factors = random_factors(gen, n, C, d)
    base = tc.coherence_from_factors(factors)
    perm = torch.randperm(n, generator=gen)
    permuted = tc.coherence_from_factors(factors[perm])
    scaled = tc.coherence_from_factors(2.7 * factors)  # H_i -> 7.29 H_i
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    rotated = tc.coherence_from_hessians(Q @ hessians_from_factors(factors) @ Q.T)
    assert permuted.sigma == pytest.approx(base.sigma, rel=1e-12)
    torch.testing.assert_close(permuted.S, base.S[perm][:, perm])
    assert scaled.sigma == pytest.approx(base.sigma, rel=1e-12)
    assert scaled.sharpness == pytest.approx(2.7**2 * base.sharpness, rel=1e-12)
    assert rotated.sigma == pytest.approx(base.sigma, rel=1e-10)
    assert rotated.sharpness == pytest.approx(base.sharpness, rel=1e-10)


def test_float32_input_is_reduced_in_float64(gen) -> None:
    factors = random_factors(gen, 8, 3, 5)
    s32 = tc.coherence_from_factors(factors.float())
    s64 = tc.coherence_from_factors(factors)
    assert s32.S.dtype == torch.float64
    assert s32.sigma == pytest.approx(s64.sigma, rel=1e-5)
    h32 = tc.coherence_from_hessians(hessians_from_factors(factors).float())
    assert h32.sigma == pytest.approx(s64.sigma, rel=1e-5)


# ------------------------------------------------------------------------------ eig methods


@pytest.mark.parametrize("method", ["exact", "lanczos", "power", "auto"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_eig_methods_agree(method: str, entry: str, gen) -> None:
    factors = random_factors(gen, 30, 3, 9)
    exact = stats_via(entry, factors, eig_method="exact")
    other = stats_via(entry, factors, eig_method=method)
    assert other.sigma == pytest.approx(exact.sigma, rel=1e-6)
    assert other.sharpness == pytest.approx(exact.sharpness, rel=1e-6)


def test_auto_switches_to_lanczos_above_threshold(monkeypatch, gen) -> None:
    monkeypatch.setattr(linalg, "AUTO_EXACT_MAX", 16)
    factors = random_factors(gen, 40, 2, 6)
    auto = tc.coherence_from_factors(factors, eig_method="auto")
    exact = tc.coherence_from_factors(factors, eig_method="exact")
    assert auto.eig_method == "lanczos"
    assert exact.eig_method == "exact"
    assert auto.sigma == pytest.approx(exact.sigma, rel=1e-6)
    assert auto.sharpness == pytest.approx(exact.sharpness, rel=1e-6)


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("hessians", "match"),
    [
        (torch.zeros(3, 2, 4), r"hessians must have shape \(n, d, d\)"),
        (torch.zeros(4, 4), r"hessians must have shape \(n, d, d\)"),
        (torch.zeros(0, 2, 2), "n >= 1"),
    ],
)
def test_hessians_shape_errors(hessians: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tc.coherence_from_hessians(hessians)


def test_non_finite_entries_are_rejected() -> None:
    H = torch.eye(3, dtype=F64).repeat(2, 1, 1)
    H[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="hessians contains 1 NaN or infinite"):
        tc.coherence_from_hessians(H)
    A = torch.ones(2, 1, 3, dtype=F64)
    A[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="factors contains 1 NaN or infinite"):
        tc.coherence_from_factors(A)


def test_asymmetric_matrix_is_rejected() -> None:
    H = torch.eye(3, dtype=F64).repeat(2, 1, 1)
    H[0, 0, 1] = 0.5
    with pytest.raises(ValueError, match="hessians must be symmetric"):
        tc.coherence_from_hessians(H)


def test_negative_eigenvalue_is_reported() -> None:
    H = torch.eye(3, dtype=F64).repeat(4, 1, 1)
    H[2] = torch.diag(torch.tensor([1.0, -0.25, 0.5], dtype=F64))
    with pytest.raises(ValueError, match=r"most negative eigenvalue -0\.25 \(matrix 2\)"):
        tc.coherence_from_hessians(H)
    K = torch.eye(4, dtype=F64)
    K[3, 3] = -1e-3
    with pytest.raises(ValueError, match="gram must be positive semi-definite"):
        tc.coherence_from_gram(K)


def test_indefinite_gram_with_psd_diagonal_blocks_is_rejected() -> None:
    K = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # eigenvalues 3, -1
    with pytest.raises(ValueError, match="most negative eigenvalue -1"):
        tc.coherence_from_gram(K, eig_method="exact")


def test_tiny_negative_rounding_is_tolerated(gen) -> None:
    factors = random_factors(gen, 5, 1, 2)  # rank-one H_i: exact zeros up to rounding
    H = hessians_from_factors(factors)
    H = H - 1e-16 * torch.eye(2, dtype=F64)
    assert tc.coherence_from_hessians(H).sigma >= 1


def test_zero_curvature_raises_explicit_undefined_error() -> None:
    with pytest.raises(tc.UndefinedCoherenceError, match="sigma is undefined"):
        tc.coherence_from_hessians(torch.zeros(4, 3, 3))
    with pytest.raises(tc.UndefinedCoherenceError, match="all 5 per-sample curvatures are zero"):
        tc.coherence_from_factors(torch.zeros(5, 2, 3))
    assert issubclass(tc.UndefinedCoherenceError, ValueError)


@pytest.mark.parametrize(
    ("gram", "match"),
    [
        (torch.zeros(3, 4), r"gram of shape \(n, n\) must be square"),
        (torch.zeros(3, 2, 4, 2), r"gram must have shape \(n, C, n, C\)"),
        (torch.zeros(3, 2, 3), r"gram must have shape \(n, C, n, C\)"),
    ],
)
def test_gram_shape_errors(gram: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tc.coherence_from_gram(gram)


def test_type_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"hessians must be a torch\.Tensor"):
        tc.coherence_from_hessians(np.eye(2)[None])
    with pytest.raises(TypeError, match="factors must have a floating-point dtype"):
        tc.coherence_from_factors(torch.ones(2, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="eig_method must be one of"):
        tc.coherence_from_factors(torch.ones(2, 1, 3), eig_method="qr")
