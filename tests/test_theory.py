"""Stability thresholds: hand-derived numbers, consistency, and brute-force mean-square growth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from references import F64, hessians_from_factors, random_factors

import torch_coherence as tc
from torch_coherence import theory


def bernoulli_second_moment_operator(H: np.ndarray, lr: float, batch_size: int) -> np.ndarray:
    """E[J_hat (x) J_hat] by enumerating all 2^n Bernoulli(B/n) batches (Definition 1)."""
    n, d, _ = H.shape
    p = batch_size / n
    T = np.zeros((d * d, d * d))
    for x in itertools.product((0, 1), repeat=n):
        k = sum(x)
        prob = p**k * (1 - p) ** (n - k)
        J = np.eye(d) - lr / batch_size * np.tensordot(np.array(x, float), H, axes=1)
        T += prob * np.kron(J, J)
    return T


def spectral_radius(T: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(T)).max())


# ----------------------------------------------------------------------- hand-derived values


def test_hand_derived_numbers() -> None:
    # sigma = 2, eta = 0.5, B = 20, n = 100: r = n/B - 1 = 4.
    assert tc.theorem1_threshold(2, 0.5, 20, 100) == pytest.approx(2.0)  # (2/0.5)/sqrt(4)
    assert tc.theorem2_bound(2, 0.5, 20, 100) == pytest.approx(8 / 6)  # (4/0.5)/(2+4)
    assert tc.gd_threshold(0.5) == pytest.approx(4.0)
    assert tc.gd_threshold(0.5, momentum=0.9) == pytest.approx(7.6)
    assert tc.critical_lr(1.0, 2, 20, 100) == pytest.approx(1.0)  # min(2/1, 2/(1*2))
    assert tc.critical_lr(5.0, 2, 20, 100) == pytest.approx(0.2)  # min(0.4, 0.2)
    assert tc.critical_lr(5.0, 9, 20, 100) == pytest.approx(0.4)  # GD binds: min(0.4, 0.9)
    assert tc.critical_batch_size(1.0, 2, 0.5, 100) == pytest.approx(100 / 17)
    assert tc.sam_threshold(2, 0.5, 20, 100, rho=0.1, lambda_min=5.0) == pytest.approx(2 / 1.5)
    assert tc.sam_threshold(2, 0.5, 20, 100, rho=0.1, alpha=0.5, lambda_min=5.0) == 1.0


def test_full_batch_limits() -> None:
    assert tc.theorem1_threshold(3, 0.1, 50, 50) == math.inf
    assert tc.theorem2_bound(3, 0.1, 50, 50) == pytest.approx(2 / 0.1)  # = GD threshold
    assert tc.critical_lr(4.0, 3, 50, 50) == pytest.approx(0.5)  # only GD: 2/4
    rep = tc.stability_report(4.0, 3, 0.6, 50, 50)
    assert rep.binding == "gd"
    assert rep.unstable
    assert rep.margin == pytest.approx(4.0 / (2 / 0.6))


def test_zero_sharpness() -> None:
    assert tc.critical_lr(0.0, 2, 10, 100) == math.inf
    assert tc.critical_batch_size(0.0, 2, 0.1, 100) == 0.0
    rep = tc.stability_report(0.0, 2, 0.1, 10, 100)
    assert rep.margin == 0.0
    assert not rep.unstable


def test_critical_batch_size_is_infinite_when_gd_diverges() -> None:
    assert tc.critical_batch_size(30.0, 2, 0.1, 100) == math.inf  # eta lambda = 3 > 2
    assert tc.critical_batch_size(20.0, 2, 0.1, 100) < 100  # eta lambda = 2: not strictly above
    assert tc.critical_batch_size(30.0, 2, 0.1, 100, momentum=0.6) < 100  # 3 < 2 (1.6)


def test_theorem2_bound_never_exceeds_theorem1() -> None:
    for sigma, lr, b, n in itertools.product([1, 1.5, 7, 100], [0.01, 1], [1, 3, 50], [50, 1000]):
        assert tc.theorem2_bound(sigma, lr, b, n) <= tc.theorem1_threshold(sigma, lr, b, n)


# ------------------------------------------------------------------------------ consistency


@pytest.mark.parametrize(
    ("sharpness", "sigma", "lr", "n"),
    [(1.5, 3.0, 0.1, 1000), (12.0, 1.0, 0.05, 60000), (0.4, 4.0, 1.0, 1797)],
)
def test_thresholds_equal_sharpness_at_critical_values(sharpness, sigma, lr, n) -> None:
    b_crit = tc.critical_batch_size(sharpness, sigma, lr, n)
    assert 1 <= b_crit <= n
    assert tc.theorem1_threshold(sigma, lr, b_crit, n) == pytest.approx(sharpness, rel=1e-12)
    b = max(1.0, b_crit / 3)
    lr_crit = tc.critical_lr(sharpness, sigma, b, n)
    rep = tc.stability_report(sharpness, sigma, lr_crit, b, n)
    assert rep.divergence_threshold == pytest.approx(sharpness, rel=1e-12)
    assert rep.margin == pytest.approx(1.0, rel=1e-12)
    assert tc.stability_report(sharpness, sigma, 1.01 * lr_crit, b, n).unstable
    assert not tc.stability_report(sharpness, sigma, 0.99 * lr_crit, b, n).unstable


def test_gd_threshold_with_sam_solves_its_quadratic() -> None:
    lr, beta, q = 0.2, 0.5, 0.3
    t = tc.gd_threshold(lr, beta, sam_rho=0.6, sam_alpha=2.0)
    assert t * (1 + q * t) == pytest.approx(2 * (1 + beta) / lr, rel=1e-12)
    assert tc.gd_threshold(lr, sam_rho=0.0) == tc.gd_threshold(lr)
    lr_crit = tc.critical_lr(t, 1.0, 10, 10, momentum=beta, sam_rho=0.6, sam_alpha=2.0)
    assert lr_crit == pytest.approx(lr, rel=1e-12)


def test_sam_with_zero_lambda_min_equals_sgd() -> None:
    args = (4.0, 0.3, 16, 512)
    assert tc.sam_threshold(*args, rho=0.05) == tc.theorem1_threshold(*args)
    rep = tc.stability_report(5.0, 4.0, 0.3, 16, 512, sam_rho=0.05, lambda_min=0.0)
    assert rep.sam_threshold == rep.theorem1_threshold
    assert rep.binding == "sam"


def test_batch_size_proportional_to_lr_squared_invariance() -> None:
    # Theorem 1 reads lambda^2 eta^2 n (1/B - 1/n) > sigma^2: invariant when
    # (1/B - 1/n) scales like 1/eta^2; for B << n this is B proportional to eta^2.
    sharp, sigma, n, lr, b = 2.0, 5.0, 10_000, 0.1, 20.0
    base = tc.stability_report(sharp, sigma, lr, b, n).margin
    for c in (0.5, 2.0, 3.0):
        b_c = 1.0 / ((1.0 / b - 1.0 / n) / c**2 + 1.0 / n)
        assert tc.stability_report(sharp, sigma, c * lr, b_c, n).margin == pytest.approx(base)
    crit = [tc.critical_batch_size(sharp, sigma, c * lr, n) for c in (0.5, 1.0, 2.0)]
    scaled = [(1 / bc - 1 / n) * (c * lr) ** 2 for bc, c in zip(crit, (0.5, 1.0, 2.0), strict=True)]
    assert scaled == pytest.approx([scaled[0]] * 3, rel=1e-12)


# --------------------------------------------------------- brute force: mean-square growth


def test_theorem1_condition_implies_mean_square_divergence(gen) -> None:
    """Whenever Theorem 1's condition holds, E||J_k...J_1||_F^2 grows (rho(T) > 1)."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(60):
        n, d = 5, 3
        rank = 1 if trial % 2 else 2
        H = hessians_from_factors(random_factors(gen, n, rank, d))
        stats = tc.coherence_from_hessians(H)
        b = int(rng.integers(1, n))
        lr = float(rng.uniform(0.2, 3.0)) / stats.sharpness
        rep = tc.stability_report(stats.sharpness, stats.sigma, lr, b, n)
        rho = spectral_radius(bernoulli_second_moment_operator(H.numpy(), lr, b))
        if rep.unstable:
            checked += 1
            assert rho > 1.0, (trial, rep.margin, rho)
    assert checked >= 10  # the condition fired often enough for the test to mean something


@pytest.mark.parametrize(("n", "s", "b"), [(6, 2, 2), (8, 3, 1), (7, 7, 3)])
def test_theorem2_construction_converges_below_bound(n, s, b) -> None:
    """The construction of Theorem 2's proof: mean-square stable just below the bound."""
    lam = 1.0
    bound_lr = 2 * s / (lam * (s + n / b - 1))  # eta at which lambda_1 equals the bound
    m = lam * n / s
    H = np.zeros((n, 1, 1))  # only e_1 moves; other coordinates have J = 1 and stay bounded
    H[:s, 0, 0] = m
    below = spectral_radius(bernoulli_second_moment_operator(H, 0.98 * bound_lr, b))
    above = spectral_radius(bernoulli_second_moment_operator(H, 1.02 * bound_lr, b))
    assert below < 1.0 < above  # for this construction the bound is the exact boundary
    stats = tc.coherence_from_hessians(torch.from_numpy(H))
    assert tc.theorem2_bound(stats.sigma, bound_lr, b, n) == pytest.approx(lam)


def test_first_moment_counterexample_from_math_md() -> None:
    """n = 3, d = 1, curvatures (1, 1/4, 1/4), B = 1, eta = 2.25 (docs/theory.md §4)."""
    h = np.array([1.0, 0.25, 0.25])
    stats = tc.coherence_from_hessians(torch.tensor(h, dtype=F64).reshape(3, 1, 1))
    assert stats.sigma == pytest.approx(1.5)
    assert stats.sharpness == pytest.approx(0.5)
    rep = tc.stability_report(stats.sharpness, stats.sigma, 2.25, 1, 3)
    assert rep.theorem1_threshold == pytest.approx(0.4714045, rel=1e-6)
    assert rep.unstable
    first = second = 0.0
    for x in itertools.product((0, 1), repeat=3):
        prob = np.prod([1 / 3 if xi else 2 / 3 for xi in x])
        j = 1 - 2.25 * float(np.dot(x, h))
        first += prob * abs(j)
        second += prob * j * j
    assert second == pytest.approx(1.28125)  # E j^2 > 1: mean square diverges ...
    assert first == pytest.approx(0.976852, rel=1e-6)  # ... while E|j| < 1: first moment shrinks
    assert "mean square" in rep.explain()


# ----------------------------------------------------------------------------- the report


def test_report_fields_and_regimes() -> None:
    rep = tc.stability_report(3.0, 4.0, 0.1, 32, 1797)
    assert isinstance(rep, tc.StabilityReport)
    assert rep.regime == "undetermined"
    assert rep.binding == "theorem1"
    assert rep.margin == pytest.approx(3.0 / rep.theorem1_threshold)
    assert rep.critical_lr == pytest.approx(tc.critical_lr(3.0, 4.0, 32, 1797))
    low = tc.stability_report(0.5, 4.0, 0.1, 32, 1797)
    assert low.regime == "below_theorem2"
    assert tc.stability_report(30.0, 4.0, 0.1, 32, 1797).regime == "divergent"
    assert set(rep.as_dict()) >= {"margin", "unstable", "critical_lr", "critical_batch_size"}
    with pytest.raises(AttributeError):
        rep.margin = 0.0  # frozen


def test_explain_names_the_numbers_and_the_fix() -> None:
    text = tc.stability_report(3.0, 4.0, 0.25, 32, 1797).explain()
    assert text.startswith("UNSTABLE")
    assert "mean square" in text
    assert "learning rate 0.25" in text and "batch size 32" in text
    assert "lower the learning rate below 0.1795" in text
    assert "raise the batch size above" in text
    gd = tc.stability_report(30.0, 4.0, 0.1, 32, 1797).explain()
    assert "no batch size helps" in gd
    calm = tc.stability_report(3.0, 4.0, 0.1, 32, 1797).explain()
    assert calm.startswith("No guaranteed divergence")
    assert "cannot decide" in calm
    assert "E||w||" not in calm


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: tc.theorem1_threshold(2, 0.0, 10, 100), ValueError, "lr must be > 0"),
        (lambda: tc.theorem1_threshold(2, -1, 10, 100), ValueError, "lr must be > 0"),
        (lambda: tc.theorem1_threshold(0.5, 0.1, 10, 100), ValueError, "sigma must be"),
        (lambda: tc.theorem1_threshold(2, 0.1, 0, 100), ValueError, r"batch_size must lie"),
        (lambda: tc.theorem1_threshold(2, 0.1, 101, 100), ValueError, r"\[1, 100\]"),
        (lambda: tc.theorem2_bound(2, 0.1, 1, 0), ValueError, "n must be an integer >= 1"),
        (lambda: tc.theorem2_bound(2, 0.1, 1, 2.5), TypeError, "n must be an integer"),
        (lambda: tc.gd_threshold(0.1, momentum=1.0), ValueError, r"momentum must lie in \[0, 1\)"),
        (lambda: tc.critical_lr(float("nan"), 2, 1, 10), ValueError, "sharpness must not be NaN"),
        (lambda: tc.critical_lr(-1.0, 2, 1, 10), ValueError, "sharpness must be a finite"),
        (lambda: tc.critical_batch_size(1.0, float("inf"), 0.1, 10), ValueError, "sigma"),
        (lambda: tc.sam_threshold(2, 0.1, 1, 10, rho=-0.1), ValueError, "sam_rho"),
        (lambda: tc.sam_threshold(2, 0.1, 1, 10, rho=0.1, alpha=0), ValueError, "sam_alpha"),
        (lambda: tc.stability_report("1", 2, 0.1, 1, 10), TypeError, "sharpness must be a real"),
        (lambda: tc.stability_report(1, 2, 0.1, 1, 10, lambda_min=-1), ValueError, "lambda_min"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_module_exports() -> None:
    for name in theory.__all__:
        assert getattr(tc, name) is getattr(theory, name)
