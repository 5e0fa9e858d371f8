"""The top Lyapunov exponent gamma (typical-run stability) against independent references.

References here share no code with :mod:`torch_coherence.dynamics.lyapunov`: binomial and
hypergeometric expectations from ``scipy.stats`` / ``math.comb``, enumeration of every batch,
a plain NumPy loop over sampled Jacobians (renormalised products), NumPy eigenvalues of the
deterministic (B = n) iteration matrices, and ``scipy.optimize.brentq`` on the enumerated
exponent for the critical values.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from references import F64, random_hessians, section51_hessians, top_eig
from scipy import optimize, stats

import torch_coherence as tc
from torch_coherence.dynamics import (
    LyapunovEstimate,
    LyapunovPrecisionWarning,
    critical_batch_size_typical,
    critical_lr_exact,
    critical_lr_typical,
    disagreement_demo,
    lyapunov_exponent,
    mean_square_rate,
    stability_verdict,
)
from torch_coherence.dynamics.phase import phase_diagram, section51_lyapunov

SAMPLINGS = ("bernoulli", "without_replacement")


# ------------------------------------------------------------------ independent references


def section51_reference(n, s, lr, b, sampling, q=0.0):
    """(coherent, private) E log|j| of §5.1 via scipy.stats (private: (B/n) log|1 - c|)."""
    m = 2.0 * n / s
    c = lr * m / b
    xs = np.arange(s + 1)
    if sampling == "bernoulli":
        pmf = stats.binom.pmf(xs, s, b / n)
    else:
        pmf = stats.hypergeom.pmf(xs, n, s, b)
    j = 1.0 - c * (1.0 + 2.0 * q) * xs
    keep = pmf > 0
    with np.errstate(divide="ignore"):
        coherent = float(np.sum(pmf[keep] * np.log(np.abs(j[keep]))))
    jp = abs(1.0 - c * (1.0 + 2.0 * q / s))
    private = b / n * math.log(jp) if jp > 0 else -math.inf
    return coherent, (private if s < n else -math.inf)


def enumerated_scalar_exponent(h, lr, b, sampling):
    """E log|1 - (eta/B) sum_{i in batch} h_i| by enumerating every batch (d = 1)."""
    n = len(h)
    total = 0.0
    if sampling == "bernoulli":
        p = b / n
        for x in itertools.product((0, 1), repeat=n):
            prob = p ** sum(x) * (1 - p) ** (n - sum(x))
            total += prob * math.log(abs(1 - lr / b * float(np.dot(x, h))))
    else:
        subsets = list(itertools.combinations(range(n), b))
        for sub in subsets:
            total += math.log(abs(1 - lr / b * sum(h[i] for i in sub))) / len(subsets)
    return total


def tiled_dataset(H, n):
    """The data set of n the m curvatures stand for: sample j is w_i H_i, i = j mod m."""
    m = H.shape[0]
    c = np.array([n // m + (i < n % m) for i in range(m)])
    idx = np.arange(n) % m
    return H[idx] * (n / (m * c[idx]))[:, None, None]


def numpy_lyapunov(H, lr, b, sampling, steps, paths, seed, momentum=0.0, q=0.0, burn=200):
    """Plain loop: w <- J_hat w (+ momentum), renormalised each step; mean log growth.

    H is the whole data set (N, d, d); returns (mean over paths, standard error).
    """
    rng = np.random.default_rng(seed)
    N, d, _ = H.shape
    P = np.eye(d) + q * H.mean(0)
    HP = H @ P
    w = rng.standard_normal((paths, d))
    wp = rng.standard_normal((paths, d)) if momentum else np.zeros((paths, d))
    logs = np.zeros(paths)
    for k in range(steps):
        if sampling == "bernoulli":
            x = (rng.random((paths, N)) < b / N).astype(float)
        else:
            x = np.zeros((paths, N))
            for p in range(paths):
                x[p, rng.choice(N, size=int(b), replace=False)] = 1.0
        step = np.einsum("pn,nde,pe->pd", x, HP, w) / b
        new = w - lr * step + momentum * (w - wp)
        norm = np.sqrt((new**2).sum(1) + (w**2).sum(1) * (momentum > 0))
        wp, w = w / norm[:, None], new / norm[:, None]
        if k >= burn:
            logs += np.log(norm)
    est = logs / (steps - burn)
    return est.mean(), est.std(ddof=1) / math.sqrt(paths)


# ------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_section51_exact_values(sampling):
    """Binomial / hypergeometric E log|1 - eta m X / B| and (B/n) log|1 - eta m / B|."""
    n = 20
    which = set()
    signs = set()
    for s, lr, b, q in [(4, 0.8, 3, 0.0), (1, 0.5, 2, 0.0), (20, 0.3, 7, 0.0), (10, 0.9, 1, 0.0),
                        (5, 0.6, 10, 0.0), (4, 0.7, 3, 0.3), (2, 0.45, 12, 0.1)]:  # fmt: skip
        coherent, private = section51_reference(n, s, lr, b, sampling, q)
        want = max(coherent, private)
        which.add(coherent > private)
        signs.add(want > 0)
        sam = dict(sam_rho=q) if q else {}
        H = section51_hessians(n, s)
        got = lyapunov_exponent(H, lr, b, sampling=sampling, **sam)
        assert got.exact and got.method == "commuting" and got.stderr == 0.0
        assert got.value == pytest.approx(want, rel=1e-11, abs=1e-12)
        # the same curvature as rank-one factors in a rotated basis: commuting, detected
        d = H.shape[1]
        Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=F64,
                                           generator=torch.Generator().manual_seed(s)))  # fmt: skip
        diag = torch.diagonal(H, dim1=1, dim2=2)
        A = (diag.sqrt() @ Q.T).unsqueeze(1)  # (n, 1, d): A_i = sqrt(m) (Q e_k)^T
        assert torch.allclose(A.transpose(1, 2) @ A, Q @ H @ Q.T)
        rot = lyapunov_exponent(A, lr, b, sampling=sampling, kind="factors", **sam)
        assert rot.exact and rot.value == pytest.approx(want, rel=1e-9, abs=1e-10)
        assert section51_lyapunov(n, s, lr, b, sampling, q) == pytest.approx(want, rel=1e-12)
    assert which == {True, False}  # both coordinates are the top one somewhere
    assert signs == {True, False}


def test_math_md_section4_example_typical_vs_mean_square():
    """n = 3, (1, 1/4, 1/4), B = 1, eta = 2.25: rho(T) = E j^2 = 1.28 > 1 but gamma < 0."""
    h = [1.0, 0.25, 0.25]
    D = torch.tensor(h, dtype=F64).unsqueeze(1)
    rho = mean_square_rate(D, 2.25, 1, kind="diagonal")
    gam = lyapunov_exponent(D, 2.25, 1, kind="diagonal")
    want = enumerated_scalar_exponent(h, 2.25, 1, "bernoulli")
    assert rho == pytest.approx(1.28125, rel=1e-12)
    assert gam.exact and gam.value == pytest.approx(want, rel=1e-12)
    assert gam.value == pytest.approx(-0.24577, abs=1e-5)
    assert gam.value < 0 < math.log(rho)
    # the Monte-Carlo estimator agrees with the exact value
    mc = lyapunov_exponent(D, 2.25, 1, kind="diagonal", method="monte_carlo", seed=3)
    assert not mc.exact and abs(mc.value - want) <= 4 * mc.stderr
    assert mc.stderr < 0.02
    # the demo shows the disagreement with the verdict's wording
    text = disagreement_demo()
    assert "eta = 2.25: rho(T) = 1.2812, gamma = -0.2458" in text
    assert "mean-square unstable: fluctuations grow without bound although most runs still " \
           "settle" in text  # fmt: skip
    assert "typically unstable: a typical run of the linearized dynamics diverges" in text


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_scalar_enumeration_other_values(sampling):
    """Diagonal (d = 1) exact path against the enumeration of every batch."""
    h = [0.9, 0.3, 0.3, 0.05, 1.4]
    D = torch.tensor(h, dtype=F64).unsqueeze(1)
    for lr, b in [(0.7, 1), (1.3, 2), (2.6, 3), (3.1, 5)]:
        got = lyapunov_exponent(D, lr, b, sampling=sampling, kind="diagonal")
        want = enumerated_scalar_exponent(h, lr, b, sampling)
        assert got.exact
        assert got.value == pytest.approx(want, rel=1e-11, abs=1e-12)


# ------------------------------------------------------------------------ Monte-Carlo


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize(
    ("lr", "b", "n", "momentum", "q"),
    [(1.6, 2, None, 0.0, 0.0), (2.4, 1, None, 0.0, 0.0), (0.9, 2, None, 0.5, 0.0),
     (1.2, 2, None, 0.0, 0.4), (1.8, 3, 10, 0.0, 0.0), (1.5, 2, 7, 0.0, 0.0)],
)  # fmt: skip
def test_monte_carlo_matches_numpy_loop(sampling, lr, b, n, momentum, q):
    """Random PSD sets (5 samples, rank 2, d = 3), also n > m (tiled data set)."""
    H = random_hessians(5)
    lr = lr / top_eig(H)
    sam = dict(sam_rho=q) if q else {}
    got = lyapunov_exponent(H, lr, b, n, sampling=sampling, momentum=momentum, steps=1200,
                            repeats=16, seed=11, **sam)  # fmt: skip
    assert not got.exact and got.method == "monte_carlo"
    data = tiled_dataset(H.numpy(), n or 5)
    ref, ref_se = numpy_lyapunov(data, lr, b, sampling, 1200, 16, seed=5, momentum=momentum, q=q)
    se = math.hypot(got.stderr, ref_se)
    assert abs(got.value - ref) <= 4.5 * se + 1e-3, (got, ref, ref_se)
    assert 0 < got.stderr < 0.02
    # typical growth is not the mean-square rate: gamma sits clearly below (1/2) log rho(T)
    rho = mean_square_rate(H, lr, b, n, sampling=sampling, momentum=momentum, **sam)
    assert got.value + 4 * got.stderr < 0.5 * math.log(rho)


def test_monte_carlo_matches_exact_commuting():
    """Monte Carlo on the §5.1 construction agrees with the exact binomial formula."""
    H = section51_hessians(12, 3)
    for sampling in SAMPLINGS:
        exact = lyapunov_exponent(H, 0.7, 2, sampling=sampling)
        mc = lyapunov_exponent(H, 0.7, 2, sampling=sampling, method="monte_carlo", seed=2)
        assert exact.exact and not mc.exact
        assert abs(mc.value - exact.value) <= 4 * mc.stderr
        assert mc.stderr < 0.05 * abs(exact.value)


def test_jensen_gamma_below_half_log_rho():
    """gamma <= (1/2) log rho(T) (E log <= log E), with margin on both sides of 1."""
    cases = 0
    gaps = []
    for sampling in SAMPLINGS:
        for s, lr, b in itertools.product([1, 4, 20], [0.3, 0.8, 1.4], [1, 5, 17]):
            H = section51_hessians(20, s)
            g = lyapunov_exponent(H, lr, b, sampling=sampling).value
            r = mean_square_rate(H, lr, b, sampling=sampling)
            assert g <= 0.5 * math.log(r) + 1e-12
            gaps.append((g > 0, r > 1))
            cases += 1
        H = random_hessians(8)
        for lr, mom, q in [(1.0, 0.0, 0.0), (2.2, 0.0, 0.0), (1.0, 0.4, 0.0), (1.5, 0.0, 0.5)]:
            eta = lr / top_eig(H)
            kw = dict(sampling=sampling, momentum=mom, **(dict(sam_rho=q) if q else {}))
            e = lyapunov_exponent(H, eta, 2, steps=800, repeats=8, seed=1, **kw)
            assert e.value - 3 * e.stderr <= 0.5 * math.log(mean_square_rate(H, eta, 2, **kw))
    # the grid has mean-square divergent cells whose typical run contracts
    assert (False, True) in gaps and (True, True) in gaps and (False, False) in gaps


# ---------------------------------------------------------------- deterministic limits B = n


def momentum_matrix(H, lr, beta):
    d = H.shape[0]
    eye = np.eye(d)
    return np.block([[(1 + beta) * eye - lr * H, -beta * eye], [eye, np.zeros((d, d))]])


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_momentum_and_sam_deterministic_limit(sampling):
    """At B = n every Jacobian is the GD one: gamma = log of its spectral radius."""
    Ht = random_hessians(3, n=6, C=1, d=4)
    H = Ht.numpy().mean(0)
    lam = top_eig(Ht)
    for lr, beta in [(1.2 / lam, 0.5), (3.5 / lam, 0.6), (0.5 / lam, 0.9)]:
        want = math.log(np.abs(np.linalg.eigvals(momentum_matrix(H, lr, beta))).max())
        got = lyapunov_exponent(Ht, lr, 6, sampling=sampling, momentum=beta)
        assert got.exact and got.method == "deterministic"
        assert got.value == pytest.approx(want, rel=1e-9, abs=1e-12)
        mc = lyapunov_exponent(Ht, lr, 6, sampling=sampling, momentum=beta, method="monte_carlo",
                               steps=600, repeats=4, seed=0)  # fmt: skip
        assert mc.value == pytest.approx(want, abs=3e-3)  # O(1/steps) transient
        # not the plain-GD value: momentum changes it
        gd = math.log(np.abs(np.linalg.eigvals(np.eye(4) - lr * H)).max())
        assert abs(want - gd) > 0.03
    for lr, q in [(1.2 / lam, 0.3), (2.5 / lam, 1.0)]:
        J = np.eye(4) - lr * H @ (np.eye(4) + q * H)
        want = math.log(np.abs(np.linalg.eigvals(J)).max())
        got = lyapunov_exponent(Ht, lr, 6, sampling=sampling, sam_rho=q)
        assert got.value == pytest.approx(want, rel=1e-9)
        mc = lyapunov_exponent(Ht, lr, 6, sampling=sampling, sam_rho=q, method="monte_carlo",
                               steps=600, repeats=4, seed=0)  # fmt: skip
        assert mc.value == pytest.approx(want, abs=3e-3)  # O(1/steps) transient


# ------------------------------------------------------------------------ critical values


def test_critical_lr_typical_exact_matches_brentq():
    """§4 example (exact): the root of the enumerated exponent, above the mean-square one."""
    h = [1.0, 0.25, 0.25]
    D = torch.tensor(h, dtype=F64).unsqueeze(1)
    res = critical_lr_typical(D, 1, kind="diagonal")
    want = optimize.brentq(lambda e: enumerated_scalar_exponent(h, e, 1, "bernoulli"), 4.2, 6.0,
                           xtol=1e-12)  # fmt: skip
    assert res.exact and res.lr_low == res.lr == res.lr_high
    assert res.lr == pytest.approx(want, rel=2e-3)
    ms = critical_lr_exact(D, 1, kind="diagonal")
    assert ms == pytest.approx(2.0) and ms < res.lr
    below = enumerated_scalar_exponent(h, res.lr * 0.995, 1, "bernoulli")
    above = enumerated_scalar_exponent(h, res.lr * 1.005, 1, "bernoulli")
    assert below < 0 < above


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_critical_lr_typical_monte_carlo_brackets_sign_change(sampling):
    H = random_hessians(4)
    res = critical_lr_typical(H, 2, sampling=sampling, steps=600, repeats=8, seed=7)
    assert not res.exact and isinstance(res.lr, float)
    assert res.lr_low < res.lr < res.lr_high
    assert res.stderr > 0 and res.evaluations >= 10
    # common random numbers: the same seed reproduces the sign change around the root
    kw = dict(sampling=sampling, steps=600, repeats=8, seed=7)
    assert lyapunov_exponent(H, res.lr * 0.99, 2, **kw).value < 0
    assert lyapunov_exponent(H, res.lr * 1.01, 2, **kw).value > 0
    lo = lyapunov_exponent(H, res.lr_low * 0.99, 2, **kw)
    hi = lyapunov_exponent(H, res.lr_high * 1.01, 2, **kw)
    assert lo.value + 2 * lo.stderr < 0 < hi.value - 2 * hi.stderr
    # Jensen: the typical critical rate is not below the mean-square one
    ms = critical_lr_exact(H, 2, sampling=sampling)
    assert res.lr_high > ms
    # an independent estimate (other seed) falls inside a few bands of the answer
    other = critical_lr_typical(H, 2, sampling=sampling, steps=600, repeats=8, seed=8)
    width = res.lr_high - res.lr_low
    assert abs(other.lr - res.lr) <= 2 * width


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_critical_batch_size_typical_section51(sampling):
    """Exact §5.1: the smallest B with gamma <= 0 (WOR: integer; Bernoulli: real root)."""
    n, s, lr = 20, 4, 0.8

    def gamma(b):
        return max(section51_reference(n, s, lr, b, sampling))

    res = critical_batch_size_typical(section51_hessians(n, s), lr, sampling=sampling)
    assert res.exact
    if sampling == "without_replacement":
        first = next(b for b in range(1, n + 1) if gamma(b) <= 0)
        assert res.batch_size == first
        assert gamma(first - 1) > 0
    else:
        assert gamma(res.batch_size * 0.99) > 0 > gamma(res.batch_size * 1.01)
    assert res.batch_size_low == res.batch_size == res.batch_size_high
    # learning rate so large that full-batch GD diverges: no batch size helps
    big = critical_batch_size_typical(section51_hessians(n, s), 1.2, sampling=sampling)
    assert big.batch_size == math.inf
    small = critical_batch_size_typical(section51_hessians(n, s), 0.05, sampling=sampling)
    assert small.batch_size == 0.0


def test_critical_batch_size_typical_monte_carlo():
    H = random_hessians(6, n=8)
    lr = 2.0 / top_eig(H)
    res = critical_batch_size_typical(H, lr, steps=400, repeats=8, seed=4, rel_tol=1e-2)
    assert not res.exact and 1 < res.batch_size < 8
    assert res.batch_size_low < res.batch_size < res.batch_size_high
    kw = dict(steps=400, repeats=8, seed=4)
    assert lyapunov_exponent(H, lr, res.batch_size * 0.98, **kw).value > 0
    assert lyapunov_exponent(H, lr, res.batch_size * 1.02, **kw).value < 0


# --------------------------------------------------------------- bad input, warnings, misc


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [(dict(lr=-1.0), ValueError, "lr"), (dict(lr=float("nan")), ValueError, "lr"),
     (dict(batch_size=6), ValueError, "batch_size"),
     (dict(batch_size=0), ValueError, "batch_size"),
     (dict(batch_size=2.5, sampling="without_replacement"), ValueError, "batch_size"),
     (dict(n=3), ValueError, "n must be"), (dict(steps=0), ValueError, "steps"),
     (dict(repeats=0), ValueError, "repeats"), (dict(momentum=1.0), ValueError, "momentum"),
     (dict(sampling="poisson"), ValueError, "sampling"), (dict(method="x"), ValueError, "method"),
     (dict(burn_in=1000), ValueError, "burn_in"), (dict(sam_alpha=0.0), ValueError, "sam_alpha"),
     (dict(sam_rho=-1.0), ValueError, "sam_rho"), (dict(seed="a"), TypeError, "seed")],
)  # fmt: skip
def test_bad_input_names_the_argument(kwargs, exc, name):
    args = dict(curvature=random_hessians(1), lr=0.5, batch_size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        lyapunov_exponent(**args)


def test_bad_curvature_and_exact_request():
    bad = random_hessians(1).clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="curvature"):
        lyapunov_exponent(bad, 0.5, 2)
    with pytest.raises(ValueError, match="method='exact'"):
        lyapunov_exponent(random_hessians(1), 0.5, 2, method="exact")
    with pytest.raises(ValueError, match="lr"):
        critical_batch_size_typical(random_hessians(1), 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        critical_lr_typical(random_hessians(1), 9)


def test_too_few_steps_or_repeats_warn_with_the_standard_error():
    H = random_hessians(2)
    lr = 1.0 / top_eig(H)
    with pytest.warns(LyapunovPrecisionWarning, match="repeats = 2 < 4") as rec:
        e = lyapunov_exponent(H, lr, 2, repeats=2, seed=0)
    assert e.stderr > 0
    assert f"gamma = {e.value:.4g} +- {e.stderr:.3g}" in str(rec[0].message)
    with pytest.warns(LyapunovPrecisionWarning, match="steps - burn_in = 40 < 100"):
        lyapunov_exponent(H, lr, 2, steps=50, seed=0)
    with pytest.warns(LyapunovPrecisionWarning, match="nan"):
        one = lyapunov_exponent(H, lr, 2, repeats=1, seed=0)
    assert math.isnan(one.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lyapunov_exponent(H, lr, 2, seed=0)  # defaults: no warning
        lyapunov_exponent(section51_hessians(10, 2), 0.5, 2, steps=5, repeats=1)  # exact


def test_zero_curvature_and_result_type():
    e = lyapunov_exponent(torch.zeros(4, 3, dtype=F64), 0.5, 2, kind="diagonal")
    assert isinstance(e, LyapunovEstimate) and e.value == 0.0 and e.exact
    assert critical_lr_typical(torch.zeros(4, 3, dtype=F64), 2, kind="diagonal").lr == math.inf
    assert tc.lyapunov_exponent is lyapunov_exponent
    assert e.interval() == (0.0, 0.0) and not e.typically_unstable


def test_commuting_detection_on_rotated_multi_value_set():
    """Simultaneously diagonalisable h_i (shared rotation): exact, and matches Monte Carlo."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=gen))
    vals = torch.tensor([[0.0, 1.0, 0.5, 0.0], [2.0, 0.0, 0.5, 0.3], [0.0, 1.0, 0.0, 0.3],
                         [1.0, 0.2, 0.5, 0.0], [2.0, 0.0, 0.0, 0.3]], dtype=F64)  # fmt: skip
    H = Q @ torch.diag_embed(vals) @ Q.T
    for sampling in SAMPLINGS:
        lr = 1.6
        exact = lyapunov_exponent(H, lr, 2, sampling=sampling)
        diag = lyapunov_exponent(vals, lr, 2, sampling=sampling, kind="diagonal")
        assert exact.exact and exact.value == pytest.approx(diag.value, rel=1e-10)
        mc = lyapunov_exponent(H, lr, 2, sampling=sampling, method="monte_carlo", seed=1)
        assert abs(mc.value - exact.value) <= 4 * mc.stderr
    # a non-commuting perturbation is detected (falls back to Monte Carlo)
    H2 = H.clone()
    H2[0] = H2[0] + 0.1 * torch.outer(Q[:, 0] + Q[:, 1], Q[:, 0] + Q[:, 1])
    assert not lyapunov_exponent(H2, 1.6, 2, seed=0).exact


def test_stability_verdict_wording():
    assert stability_verdict(1.3, -0.2).startswith(
        "mean-square unstable: fluctuations grow without bound although most runs still settle"
    )
    assert stability_verdict(1.3, 0.2).startswith(
        "typically unstable: a typical run of the linearized dynamics diverges"
    )
    assert stability_verdict(0.8, -0.2).startswith("stable")
    est = LyapunovEstimate(0.01, 0.01, 1000, 16, 200, False, "monte_carlo", 10)
    assert stability_verdict(1.1, est).startswith("borderline")


def test_phase_diagram_lyapunov_column_is_exact_formula():
    pd = phase_diagram([0.8], [3, 10], [2, 9], n=20, steps=5, repeats=1, seed=0,
                       sampling="without_replacement")  # fmt: skip
    for row in pd.rows:
        want = max(section51_reference(20, row["sigma"], 0.8, row["B"], "without_replacement"))
        assert row["lyapunov"] == pytest.approx(want, rel=1e-12)


def test_reproduce_disagree_cli(capsys):
    from torch_coherence.cli import main

    assert main(["reproduce", "disagree"]) == 0
    out = capsys.readouterr().out
    assert "eta = 2.25: rho(T) = 1.2812, gamma = -0.2458 (exact); simulated: 0% of 200 runs " \
           "grew 1000x, 100% shrank 1000x -> mean-square unstable" in out  # fmt: skip
    assert "typical (gamma = 0) 4.69" in out


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_path_for_a_probe_standing_for_n_samples(sampling):
    """n > m: the same exponent as the explicitly tiled data set, by enumeration."""
    h = np.array([1.0, 0.25, 0.25])
    D = torch.tensor(h, dtype=F64).unsqueeze(1)
    for n, lr, b in [(6, 2.2, 2), (7, 2.5, 3), (5, 1.3, 1)]:
        got = lyapunov_exponent(D, lr, b, n, sampling=sampling, kind="diagonal")
        data = tiled_dataset(h.reshape(3, 1, 1), n)[:, 0, 0]
        want = enumerated_scalar_exponent(list(data), lr, b, sampling)
        assert got.exact and got.value == pytest.approx(want, rel=1e-11, abs=1e-12)
        assert got.value != pytest.approx(lyapunov_exponent(D, lr, min(b, 3), kind="diagonal",
                                                            sampling=sampling).value)  # fmt: skip
