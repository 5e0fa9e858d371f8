r"""Typical-run stability of linearized SGD: the top Lyapunov exponent (docs/theory.md §4, §5, §7).

Two different questions have two different answers:

* "How wild can it get?" -- the mean square. rho(T) > 1 (:func:`mean_square_rate`) means
  E||w_k||^2 -> infinity: *mean-square divergence of the linearized dynamics*.
* "Will my training blow up?" -- the typical run. The top Lyapunov exponent

      gamma = lim_{k -> inf} (1/k) log ||J_hat_k ... J_hat_1 w_0||      (almost surely)

  is the growth rate per step of almost every run (Furstenberg-Kesten, Oseledets; the
  limit does not depend on the realisation nor, for almost every w_0, on w_0). gamma > 0:
  a typical run diverges; gamma < 0: a typical run contracts.

With J_hat = I - eta H_hat (I + (rho/alpha) H) (SGD for rho = 0, SAM otherwise; heavy-ball
momentum beta acts on the state (w_t, w_{t-1})), the two are ordered by Jensen's inequality
E log X <= log E X: for every k,

    E log ||Pi_k w_0|| = (1/2) E log ||Pi_k w_0||^2 <= (1/2) log E ||Pi_k w_0||^2
                       = (1/2) log tr T^k(w_0 w_0^T) <= (k/2) log rho(T) + O(log k)

(Pi_k = J_hat_k ... J_hat_1, T the second-moment map); dividing by k, and since gamma is
also lim (1/k) E log ||Pi_k w_0|| (Furstenberg-Kesten), **gamma <= (1/2) log rho(T)**.
The gap is the heavy tail of the products: E||w_k||^2 can diverge (rho(T) > 1) while
almost every run shrinks (gamma < 0). docs/theory.md §4 gives the one-dimensional example
n = 3, curvatures (1, 1/4, 1/4), B = 1, eta = 2.25 (Bernoulli): E j^2 = 1.28 > 1 while
gamma = E log|j| = -0.2458 < 0 (:func:`torch_coherence.reproduce.disagreement_demo`).

The data set
------------
The m curvatures given stand for a data set of n >= m samples (n = m by default). For
n > m the data set is the probe *tiled*: sample j has curvature w_i H_i with i = j mod m,
so probe sample i has c_i in {floor(n/m), ceil(n/m)} copies, weighted by w_i = n / (m c_i)
so that the full-batch mean is exactly H = mean_i H_i. When m divides n (in particular
n = m) every w_i = 1, and the second moments of this model are exactly those of
:func:`mean_square_rate` (Bernoulli: (1/B - 1/n) mean_i H_i X H_i; without replacement:
the multivariate-hypergeometric covariance with coefficient (n - B)/(B (n - 1))); otherwise
they agree up to a relative O(m/n). The batch counts N_i of probe sample i are
Binomial(c_i, B/n) (Bernoulli) or multivariate hypergeometric (B out of n without
replacement), and H_hat = (1/B) sum_i N_i w_i H_i.

Exact values: commuting Jacobians
---------------------------------
When all H_i commute (diagonal curvature, the paper's §5.1 construction, or any set that is
simultaneously diagonalisable -- detected from one eigenbasis of a random combination
sum_i xi_i H_i) and there is no momentum, every J_hat is diagonal in a common basis and each
coordinate a is multiplied by its own i.i.d. factor j_a = 1 - (eta P_a / B) sum_i N_i w_i
h_ia (P_a = 1 + (rho/alpha) H_aa). Then, without sampling,

    gamma = max_a E log |j_a|,

the expectation taken over the exact distribution of the batch counts: the samples touching
coordinate a are grouped by equal curvature value, the group counts are independent
binomials (Bernoulli) or jointly multivariate hypergeometric (without replacement), and the
distribution of sum_g v_g X_g is enumerated (up to :data:`EXACT_SUPPORT_LIMIT` points;
beyond it the Monte-Carlo estimator is used). gamma = -inf when some factor is exactly 0
with positive probability. For the §5.1 construction this gives the binomial /
hypergeometric expectation of log|1 - eta m X / B| on the coherent coordinate and
(B/n) log|1 - eta m / B| on each private one
(:func:`torch_coherence.reproduce.section51_lyapunov`). At B = n (no
noise) every J_hat equals J (or the momentum companion matrix A) and gamma = log rho(A).

Monte-Carlo estimator (everything else)
---------------------------------------
In the coefficient space of :mod:`torch_coherence.dynamics.curvature_space` (dimension
r <= m C; the orthogonal complement never moves and is excluded, like in rho(T)),
``repeats`` independent runs are propagated together as a batch of vectors from random
Gaussian starts; after each step the state is renormalised and the log of its norm growth
recorded. After ``burn_in`` steps (default steps // 5, so that the vector aligns with the
top Oseledets direction) the per-run estimate is the mean log growth of the remaining
K = steps - burn_in steps, gamma_hat is the mean over runs and the standard error is the
sample standard deviation of the per-run estimates over sqrt(repeats) (the runs are
independent). The bias of a run of K steps is O(1/K). Fewer than :data:`MIN_REPEATS` runs or
:data:`MIN_STEPS` averaged steps give a :class:`LyapunovPrecisionWarning` quoting the
standard error.

Cost: 4 m C r flops per run, learning rate and step, in single precision (every state is
renormalised each step; the log growths are summed in float64; an overflowing run is
repeated in float64). The runs of several learning rates are propagated together as one
batch (common random numbers: the same starts and batch counts for every learning rate),
which reads the factors once per step for all of them. ``benchmarks/bench_dynamics.py``
measures the calls a probe makes on a 64-example probe Gram (C = 10, r = 576).

The critical values :func:`critical_lr_typical` and :func:`critical_batch_size_typical` use
*common random numbers*: every evaluation reuses the same seed, so the batches and starts
are identical and gamma_hat(eta) is a continuous function of eta that a root finder can
solve (batched rounds of guarded interpolation for eta, bisection for B); the band where
gamma_hat -+ 2 stderr changes sign is reported next to the root.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from scipy.special import gammaln

from .._validation import check_momentum, check_positive, check_sample_count
from .curvature_space import CoefficientCurvature, as_coefficient_curvature
from .operator import _sam_q, check_sampling

__all__ = [
    "EXACT_SUPPORT_LIMIT",
    "LYAPUNOV_METHODS",
    "LyapunovEstimate",
    "LyapunovPrecisionWarning",
    "TypicalCriticalBatchSize",
    "TypicalCriticalLR",
    "critical_batch_size_typical",
    "critical_lr_typical",
    "lyapunov_exponent",
    "stability_verdict",
]

#: Accepted values of the ``method`` argument of :func:`lyapunov_exponent`.
LYAPUNOV_METHODS = ("auto", "exact", "monte_carlo")

#: Largest number of enumerated batch-count combinations of the exact commuting path.
EXACT_SUPPORT_LIMIT = 2_000_000

#: Fewer Monte-Carlo runs than this give a :class:`LyapunovPrecisionWarning`.
MIN_REPEATS = 4

#: Fewer averaged steps (after burn-in) than this give a :class:`LyapunovPrecisionWarning`.
MIN_STEPS = 100

F64 = torch.float64

#: dtype in which the Monte-Carlo estimator propagates its runs. Every state is renormalised
#: each step, so single precision loses nothing that matters (a relative rounding of about
#: 1e-7 per step against standard errors of 1e-5 and more) and halves the cost; the log
#: growths are summed in float64, and an overflowing run is repeated in float64.
MC_DTYPE = torch.float32

#: Steps of batch counts drawn at once by the Monte-Carlo estimator.
_CHUNK = 64

#: Largest steps * repeats * m of batch counts kept between evaluations of a critical value.
_CACHE_MAX_ENTRIES = 50_000_000


class LyapunovPrecisionWarning(UserWarning):
    """The Monte-Carlo Lyapunov estimate used too few steps or repeats to be meaningful."""


@dataclass(frozen=True)
class LyapunovEstimate:
    """Top Lyapunov exponent of linearized SGD (:func:`lyapunov_exponent`).

    Attributes:
        value: gamma, the typical log growth per step of ||w_k|| (natural log). > 0: a
            typical run diverges; < 0: it contracts. -inf when runs are annihilated exactly.
        stderr: standard error of ``value`` over the independent repeats (0.0 when exact,
            NaN with a single repeat).
        steps: steps per run (including ``burn_in``; 0 when exact).
        repeats: independent runs (0 when exact).
        burn_in: steps discarded at the start of every run (0 when exact).
        exact: True when no sampling was used (commuting Jacobians, no noise, zero
            curvature).
        method: ``"commuting"`` (exact max_a E log|j_a|), ``"deterministic"`` (B = n:
            log of the spectral radius of the fixed Jacobian), ``"zero"`` (no curvature:
            gamma = 0) or ``"monte_carlo"``.
        n: data-set size the curvatures stand for.
    """

    value: float
    stderr: float
    steps: int
    repeats: int
    burn_in: int
    exact: bool
    method: str
    n: int

    @property
    def typically_unstable(self) -> bool:
        """gamma > 0: a typical run of the linearized dynamics diverges."""
        return self.value > 0

    def interval(self, z: float = 2.0) -> tuple[float, float]:
        """(value - z stderr, value + z stderr)."""
        return (self.value - z * self.stderr, self.value + z * self.stderr)


@dataclass(frozen=True)
class TypicalCriticalLR:
    """Learning rate at which the top Lyapunov exponent crosses 0 (:func:`critical_lr_typical`).

    Attributes:
        lr: eta with gamma_hat(eta) = 0 (typically stable below, typically divergent above
            when gamma is increasing in eta, as it is near the crossing in every case tested).
        lr_low: eta where gamma_hat + 2 stderr = 0 (the bottom of the band in which the sign
            of gamma is not resolved at two standard errors); equals ``lr`` when exact.
        lr_high: eta where gamma_hat - 2 stderr = 0; equals ``lr`` when exact.
        stderr: standard error of gamma_hat at ``lr``.
        exact: True when gamma was computed without sampling.
        steps, repeats, seed: the common-random-number protocol of every evaluation.
        evaluations: number of gamma evaluations used.
    """

    lr: float
    lr_low: float
    lr_high: float
    stderr: float
    exact: bool
    steps: int
    repeats: int
    seed: int
    evaluations: int


@dataclass(frozen=True)
class TypicalCriticalBatchSize:
    """Batch size at which gamma crosses 0 (:func:`critical_batch_size_typical`).

    Smaller batches are typically divergent. ``inf``: even B = n has gamma > 0;
    0.0: gamma <= 0 already at B = 1.

    Attributes:
        batch_size: B with gamma_hat(B) = 0 (real for Bernoulli sampling; for sampling
            without replacement the smallest integer B with gamma_hat(B) <= 0).
        batch_size_low: where gamma_hat - 2 stderr crosses 0 (the smaller end of the band in
            which the sign is unresolved); equals ``batch_size`` when exact.
        batch_size_high: where gamma_hat + 2 stderr crosses 0; equals ``batch_size`` when
            exact.
        stderr: standard error of gamma_hat at ``batch_size`` (NaN when it is 0 or inf).
        exact, steps, repeats, seed, evaluations: as in :class:`TypicalCriticalLR`.
    """

    batch_size: float
    batch_size_low: float
    batch_size_high: float
    stderr: float
    exact: bool
    steps: int
    repeats: int
    seed: int
    evaluations: int


# ----------------------------------------------------------------------------- exact path


def _lcomb(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """log C(a, b) (a, b >= 0, b <= a)."""
    return (
        gammaln(np.asarray(a, float) + 1)
        - gammaln(np.asarray(b, float) + 1)
        - gammaln(np.asarray(a, float) - np.asarray(b, float) + 1)
    )


def _binom_pmf(K: int, p: float) -> np.ndarray:
    x = np.arange(K + 1, dtype=float)
    if p >= 1.0:
        out = np.zeros(K + 1)
        out[-1] = 1.0
        return out
    return np.exp(_lcomb(K, x) + x * math.log(p) + (K - x) * math.log1p(-p))


def _log_abs_mean(args: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    args, probs = args[keep], probs[keep]
    if bool((args == 0).any()):
        return -math.inf
    return float(np.dot(probs, np.log(np.abs(args))))


def _group_log_moment(
    values: np.ndarray,
    counts: np.ndarray,
    n: int,
    batch_size: float,
    sampling: str,
    scale: float,
    limit: int = EXACT_SUPPORT_LIMIT,
) -> float | None:
    """E log|1 - scale sum_g values_g X_g| (None when the support exceeds ``limit``).

    X_g is the number of batch members among the counts_g data-set samples of group g:
    independent Binomial(counts_g, B/n) for Bernoulli sampling, jointly multivariate
    hypergeometric (B out of n, the rest n - sum counts untouched) without replacement.
    """
    values = np.asarray(values, float)
    counts = np.asarray(counts, int)
    if float(np.prod(counts.astype(float) + 1.0)) > limit:
        return None
    if sampling == "bernoulli":
        p = batch_size / n
        total = np.zeros(1)
        prob = np.ones(1)
        for v, K in zip(values, counts, strict=True):
            pmf = _binom_pmf(int(K), p)
            keep = pmf > 0
            xs = np.arange(K + 1, dtype=float)[keep]
            total = (total[:, None] + v * xs[None, :]).ravel()
            prob = (prob[:, None] * pmf[keep][None, :]).ravel()
        return _log_abs_mean(1.0 - scale * total, prob)
    B = round(batch_size)
    rest = n - int(counts.sum())
    total = np.zeros(1)
    taken = np.zeros(1, dtype=int)
    logw = np.zeros(1)
    for v, K in zip(values, counts, strict=True):
        xs = np.arange(min(int(K), B) + 1)
        t2 = (taken[:, None] + xs[None, :]).ravel()
        keep = t2 <= B
        total = (total[:, None] + v * xs[None, :]).ravel()[keep]
        logw = (logw[:, None] + _lcomb(int(K), xs)[None, :]).ravel()[keep]
        taken = t2[keep]
    ok = B - taken <= rest
    logp = logw[ok] + _lcomb(rest, B - taken[ok]) - float(_lcomb(n, B))
    return _log_abs_mean(1.0 - scale * total[ok], np.exp(logp))


def _cluster(vals: np.ndarray, rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Group equal (to ``rtol``) values; returns (labels, representative values)."""
    order = np.argsort(vals)
    s = vals[order]
    new = np.ones(len(s), dtype=bool)
    new[1:] = np.diff(s) > rtol * np.maximum(np.abs(s[1:]), 1e-300)
    ids = np.cumsum(new) - 1
    reps = np.bincount(ids, weights=s) / np.bincount(ids)
    labels = np.empty(len(vals), dtype=int)
    labels[order] = ids
    return labels, reps


def _commuting_exact(
    D: np.ndarray, Pd: np.ndarray, copies: np.ndarray, weights: np.ndarray, n: int,
    lr: float, batch_size: float, sampling: str, limit: int = EXACT_SUPPORT_LIMIT,
) -> float | None:  # fmt: skip
    """max_a E log|j_a| for per-sample diagonals D (m, r) in a common eigenbasis.

    None when the enumerated supports of all distinct coordinates exceed ``limit`` in total.
    """
    jobs: dict[tuple, tuple[np.ndarray, np.ndarray, float]] = {}
    for a in range(D.shape[1]):
        col = D[:, a] * weights
        nz = col > 0
        if not bool(nz.any()):
            continue
        labels, reps = _cluster(col[nz])
        K = np.bincount(labels, weights=copies[nz]).round().astype(int)
        scale = lr * float(Pd[a]) / batch_size
        key = (tuple(np.round(reps / reps.max(), 12)), tuple(K), round(reps.max() * scale, 12))
        jobs.setdefault(key, (reps, K, scale))
    if sum(float(np.prod(K + 1.0)) for _, K, _ in jobs.values()) > limit:
        return None
    vals = [_group_log_moment(v, K, n, batch_size, sampling, sc) for v, K, sc in jobs.values()]
    return max(vals, default=0.0)


def _joint_diagonal(
    cc: CoefficientCurvature, rtol: float = 1e-12
) -> tuple[np.ndarray, np.ndarray] | None:
    """(D, mu): per-sample diagonals in a common eigenbasis and the mean Hessian's
    eigenvalues there, or None when the h_i do not commute.

    The basis is the eigenbasis of sum_i xi_i h_i with fixed pseudo-random xi in [1, 2]; the
    h_i are diagonal in it iff sum_a (h_i)_aa^2 = tr(h_i^2) (the off-diagonal energy is 0).
    Diagonal entries below 1e-10 of the largest are set to 0 (rotation round-off).
    """
    if cc.diagonal is not None:
        used = cc.diagonal.max(0).values > 0
        D = cc.diagonal[:, used].numpy()
        return D, D.mean(0)
    G = cc.factors
    m, c, r = G.shape
    xi = torch.rand(m, generator=torch.Generator().manual_seed(12345), dtype=F64) + 1.0
    flat = G.reshape(m * c, r)
    if _clearly_not_commuting(flat, m, c, r):
        return None
    comb = flat.T @ (flat * xi.repeat_interleave(c).unsqueeze(1))
    try:
        _, V = torch.linalg.eigh(0.5 * (comb + comb.T))
    except RuntimeError:  # LAPACK failure: treat as non-commuting (Monte Carlo is valid)
        return None
    GV = G @ V
    diag = (GV**2).sum(1)  # (m, r): (h_i)_aa in the basis V
    if c <= r:
        tr2 = ((G @ G.transpose(1, 2)) ** 2).sum((1, 2))
    else:
        tr2 = ((G.transpose(1, 2) @ G) ** 2).sum((1, 2))
    off = tr2 - (diag**2).sum(1)
    if bool((off > rtol * tr2.clamp_min(1e-300) + 1e-300).any()):
        return None
    D = diag.numpy().copy()
    D[D <= 1e-10 * D.max()] = 0.0  # round-off of the rotation, not curvature
    return D, D.mean(0)


def _clearly_not_commuting(flat: torch.Tensor, m: int, c: int, r: int) -> bool:
    """A cheap randomised test that rejects non-commuting h_i before any eigensolver.

    If all h_i commute, X = sum_i xi_i h_i and Y = sum_i zeta_i h_i commute for any
    weights; if some pair does not, [X, Y] = sum_ij xi_i zeta_j [h_i, h_j] is non-zero for
    almost every choice of weights, and [X, Y] v for almost every v. Products use the
    factors (cost O(m c r) per product). "Clearly": ||[X, Y] v|| above 1e-4 of
    ||X Y v|| + ||Y X v||, far above anything the exact test below would call commuting
    (it allows an off-diagonal energy of 1e-12, an amplitude of 1e-6); the rest goes on to
    that test.
    """
    if r < 2:
        return False
    gen = torch.Generator().manual_seed(54321)
    xi = (torch.rand(m, generator=gen, dtype=F64) + 1.0).repeat_interleave(c).unsqueeze(1)
    zeta = (torch.rand(m, generator=gen, dtype=F64) + 1.0).repeat_interleave(c).unsqueeze(1)
    v = torch.randn(r, 2, generator=gen, dtype=F64)

    def X(u: torch.Tensor) -> torch.Tensor:
        return flat.T @ (xi * (flat @ u))

    def Y(u: torch.Tensor) -> torch.Tensor:
        return flat.T @ (zeta * (flat @ u))

    xy, yx = X(Y(v)), Y(X(v))
    scale = float(xy.norm() + yx.norm())
    return scale > 0 and float((xy - yx).norm()) > 1e-4 * scale


# ------------------------------------------------------------------------ Monte-Carlo path


def _copies(m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Copies c_i of probe sample i in the tiled data set of n, and weights n / (m c_i)."""
    c = np.full(m, n // m, dtype=np.int64)
    c[: n % m] += 1
    return c, n / (m * c)


#: Data-set sizes up to this use numpy's O(n)-memory "count" multivariate hypergeometric.
_COUNT_METHOD_MAX_N = 2_000_000


class _Batches:
    """Batch counts N_i (small integers, (k, R, m) per chunk) from one seeded generator.

    The step weights are ``counts * scale`` with scale_i = w_i / B (module docstring).
    """

    def __init__(self, m: int, n: int, batch_size: float, sampling: str, R: int, gen):
        self.m, self.n, self.b, self.sampling, self.R, self.gen = m, n, batch_size, sampling, R, gen
        c, w = _copies(m, n)
        self.copies = torch.from_numpy(c.astype(float))
        self.scale = torch.from_numpy(w / batch_size)
        self.dtype = torch.uint8 if int(c.max()) < 256 else torch.int32
        self.np_rng = None
        if n != m and sampling == "without_replacement":
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            self.np_rng = np.random.default_rng(seed)
            self.c_np = c

    def chunk(self, k: int) -> torch.Tensor:
        m, R, b = self.m, self.R, self.b
        if self.n == m:
            u = torch.rand(k, R, m, generator=self.gen, dtype=F64)
            if self.sampling == "bernoulli":
                ind = u < b / self.n
            else:
                kth = u.kthvalue(round(b), dim=-1).values.unsqueeze(-1)
                ind = u <= kth
            return ind.to(self.dtype)
        if self.sampling == "bernoulli":
            prob = torch.full((k, R, m), b / self.n, dtype=F64)
            N = torch.binomial(self.copies.expand(k, R, m).contiguous(), prob, generator=self.gen)
            return N.to(self.dtype)
        method = "count" if self.n <= _COUNT_METHOD_MAX_N else "marginals"
        N = self.np_rng.multivariate_hypergeometric(self.c_np, round(b), size=(k, R),
                                                    method=method)  # fmt: skip
        return torch.from_numpy(N).to(self.dtype)


def _make_apply(cc: CoefficientCurvature, joint, q: float, dtype: torch.dtype = F64):
    """(apply, r): apply(weights (R, m), W (R, L, r)) = sum_i weights_i h_i P w for every w.

    The R runs each have their own batch weights, shared by the L learning rates of one
    batched evaluation (common random numbers). Commuting curvature (``joint`` = (D, mu) in
    a common eigenbasis) is propagated in its diagonal form (elementwise products, cost m r
    per run and step); otherwise two (R L, r) x (r, m C) products. Computed in ``dtype``.
    """
    if joint is not None:
        D = torch.from_numpy(np.ascontiguousarray(joint[0])).to(dtype)
        pd = torch.from_numpy(1.0 + q * joint[1]).to(dtype)
        return (lambda wt, W: (wt @ D).unsqueeze(1) * (W * pd)), D.shape[1]
    G = cc.factors
    m, c, r = G.shape
    P = None
    if q:
        P = (torch.eye(r, dtype=F64) + q * cc.mean_hessian()).T.contiguous().to(dtype)
    if c <= r:
        flat = G.reshape(m * c, r).to(dtype)
        flat_t = flat.T  # a view: both products read the same memory (cache)

        def apply(wt: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
            R, L, _ = W.shape
            v = W.reshape(R * L, r)
            if P is not None:
                v = v @ P
            y = (v @ flat_t).view(R, L, m, c) * wt.view(R, 1, m, 1)
            return (y.view(R * L, m * c) @ flat).view(R, L, r)

        return apply, r
    h = cc.hessians().reshape(m * r, r).to(dtype)

    def apply_h(wt: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        R, L, _ = W.shape
        v = W.reshape(R * L, r)
        if P is not None:
            v = v @ P
        return ((v @ h.T).view(R, L, m, r) * wt.view(R, 1, m, 1)).sum(2)

    return apply_h, r


def _monte_carlo(
    make_apply, r: int, m: int, n: int, lrs: list[float], batch_size: float, sampling: str,
    beta: float, steps: int, burn_in: int, repeats: int, seed: int, cache: dict | None = None,
) -> list[tuple[float, float]]:  # fmt: skip
    """(gamma_hat, stderr) for every learning rate: renormalised products, all runs at once.

    The ``repeats`` runs x ``len(lrs)`` learning rates are propagated as one (R, L, r)
    batch. Every learning rate sees the same starts and the same batch counts (common
    random numbers), drawn from one generator seeded with ``seed`` in the same order
    whatever ``lrs`` is, so a learning rate gets the same estimate alone or in any batch
    (up to the rounding of differently shaped matrix products). ``cache`` (a dict) keeps
    the batch counts of this (batch_size, seed, steps, repeats) for later calls.

    Each step renormalises every state and records its norm growth; a run's estimate is
    the mean log growth after ``burn_in``, i.e. (1/K) log(||w_steps|| / ||w_burn_in||).
    A run whose state becomes exactly 0 gives -inf. Propagation is in :data:`MC_DTYPE`
    (the log growths are summed in float64); should a norm overflow it, the evaluation is
    repeated in float64. ``make_apply(dtype)`` gives the space the runs are propagated in
    (:class:`_CoefficientSpace`) in that dtype.
    """
    for dtype in dict.fromkeys((MC_DTYPE, F64)):
        out = _monte_carlo_run(make_apply(dtype), r, m, n, lrs, batch_size, sampling, beta, steps,
                               burn_in, repeats, seed, cache, dtype)  # fmt: skip
        if out is not None:
            return out
    raise ArithmeticError("lyapunov_exponent: the norm of a run overflowed float64")


class _CoefficientSpace:
    """Runs propagated as coefficient vectors w (R, L, r): w' = w - eta sum_i s_i h_i P w."""

    def __init__(self, apply):
        self.apply = apply

    def start(self, W: torch.Tensor, Wp: torch.Tensor | None):
        return W, Wp

    def step(self, state, wt: torch.Tensor, neg_lr: torch.Tensor, beta: float):
        W, Wp = state
        Wn = torch.addcmul(W, neg_lr, self.apply(wt, W))
        if beta:
            Wn += beta * (W - Wp)
            nrm = (Wn.square().sum(2) + W.square().sum(2)).sqrt_()
        else:
            nrm = torch.linalg.vector_norm(Wn, dim=2)
        inv = nrm.reciprocal().unsqueeze(2)
        return (Wn * inv, W * inv if beta else None), nrm


def _monte_carlo_run(
    space, r, m, n, lrs, batch_size, sampling, beta, steps, burn_in, repeats, seed, cache,
    dtype,
) -> list[tuple[float, float]] | None:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(repeats, r, generator=gen, dtype=F64)
    wp0 = torch.randn(repeats, r, generator=gen, dtype=F64) if beta else None
    norm0 = (w0.square().sum(1) + (wp0.square().sum(1) if beta else 0.0)).sqrt()
    L = len(lrs)
    W = (w0 / norm0.unsqueeze(1)).unsqueeze(1).expand(repeats, L, r).to(dtype).contiguous()
    Wp = None
    if beta:
        Wp = (wp0 / norm0.unsqueeze(1)).unsqueeze(1).expand(repeats, L, r).to(dtype).contiguous()
    batches = _Batches(m, n, batch_size, sampling, repeats, gen)
    key = (batch_size, seed, steps, repeats)
    if cache is not None and key in cache:
        chunks = cache[key]
    else:
        chunks = [batches.chunk(min(_CHUNK, steps - k)) for k in range(0, steps, _CHUNK)]
        if cache is not None and steps * repeats * m <= _CACHE_MAX_ENTRIES:
            cache.clear()
            cache[key] = chunks
    scale = batches.scale.to(dtype)
    neg_lr = -torch.tensor(lrs, dtype=dtype).view(1, L, 1)
    norms = torch.empty(steps, repeats, L, dtype=dtype)
    state = space.start(W, Wp)
    k = 0
    for counts in chunks:
        for wt in counts.to(dtype) * scale:  # step weights N_i w_i / B, one chunk at once
            state, norms[k] = space.step(state, wt, neg_lr, beta)
            k += 1
    if bool(torch.isinf(norms).any()):
        return None  # a norm overflowed the propagation dtype (then 0 and NaN would follow)
    dead = (norms == 0).any(0)  # (R, L): annihilated exactly (NaN afterwards)
    tail = norms[burn_in:].to(F64)
    per_run = tail.log().sum(0) / (steps - burn_in)
    per_run[dead] = -math.inf
    out = []
    for j in range(L):
        col = per_run[:, j].numpy()
        if not np.isfinite(col).all():
            out.append((-math.inf, math.nan))
            continue
        se = float(col.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else math.nan
        out.append((float(col.mean()), se))
    return out


# ------------------------------------------------------------------------ the public API


@dataclass
class _Problem:
    """Validated, preprocessed curvature shared by all evaluations of one call."""

    cc: CoefficientCurvature
    n: int
    sampling: str
    beta: float
    q: float
    joint: tuple[np.ndarray, np.ndarray] | None
    _apply: object = None
    _cache: dict = field(default_factory=dict)

    def deterministic(self, lr: float) -> float:
        """log rho(A) of the noise-free Jacobian (B = n)."""
        H = self.cc.mean_hessian()
        r = H.shape[0]
        eye = torch.eye(r, dtype=F64)
        J = eye - lr * H @ (eye + self.q * H)
        if self.beta:
            A = torch.zeros(2 * r, 2 * r, dtype=F64)
            A[:r, :r] = J + self.beta * eye
            A[:r, r:] = -self.beta * eye
            A[r:, :r] = eye
            J = A
        rad = float(torch.linalg.eigvals(J).abs().max())
        return math.log(rad) if rad > 0 else -math.inf

    def top_eigenvalue(self) -> float:
        """lambda_1 of the mean Hessian (in the common eigenbasis when it commutes)."""
        if self.joint is not None:
            return float(np.max(self.joint[1]))
        return self.cc.top_eigenvalue()

    def exact(self, lr: float, batch_size: float) -> tuple[float, str] | None:
        if self.cc.rank == 0:
            return 0.0, "zero"
        if _noise_free(batch_size, self.n):
            return self.deterministic(lr), "deterministic"
        if self.joint is None or self.beta:
            return None
        D, mu = self.joint
        copies, weights = _copies(self.cc.m, self.n)
        val = _commuting_exact(D, 1.0 + self.q * mu, copies.astype(float), weights, self.n,
                               lr, batch_size, self.sampling)  # fmt: skip
        return None if val is None else (val, "commuting")

    def monte_carlo(
        self, lrs: list[float], batch_size, steps, burn_in, repeats, seed
    ) -> list[tuple[float, float]]:
        """(gamma_hat, stderr) for each learning rate, in one batched run (CRN)."""
        r = self.cc.rank if self.joint is None else self.joint[0].shape[1]
        return _monte_carlo(self._apply_in, r, self.cc.m, self.n, list(lrs), batch_size,
                            self.sampling, self.beta, steps, burn_in, repeats, seed,
                            self._cache)  # fmt: skip

    def _apply_in(self, dtype: torch.dtype):
        """The space the runs are propagated in, in ``dtype`` (built once per dtype)."""
        if self._apply is None:
            self._apply = {}
        if dtype not in self._apply:
            apply = _make_apply(self.cc, self.joint, self.q, dtype)[0]
            self._apply[dtype] = _CoefficientSpace(apply)
        return self._apply[dtype]


def _noise_free(batch_size: float, n: int) -> bool:
    return batch_size >= n


def _prepare(curvature, n, sampling, momentum, sam_rho, sam_alpha, kind) -> _Problem:
    cc = as_coefficient_curvature(curvature, kind)
    n = cc.m if n is None else check_sample_count("n", n)
    if n < cc.m:
        raise ValueError(
            f"n must be >= the number of curvature samples ({cc.m}): n is the data-set "
            f"size they stand for, got {n}"
        )
    sampling = check_sampling(sampling)
    beta = check_momentum(momentum)
    q = _sam_q(sam_rho, sam_alpha)
    joint = _joint_diagonal(cc) if cc.rank else None
    return _Problem(cc, n, sampling, beta, q, joint)


def _check_batch(batch_size: object, n: int, sampling: str) -> float:
    b = check_positive("batch_size", batch_size)
    if b > n:
        raise ValueError(f"batch_size must lie in (0, n] = (0, {n}], got {b}")
    if sampling == "without_replacement" and not (b.is_integer() and b >= 1):
        raise ValueError(
            f"batch_size must be an integer in [1, n] for sampling='without_replacement', got {b}"
        )
    return b


def _check_protocol(steps, repeats, burn_in, seed) -> tuple[int, int, int, int]:
    steps = check_sample_count("steps", steps)
    repeats = check_sample_count("repeats", repeats)
    if burn_in is None:
        burn_in = steps // 5
    elif isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an integer >= 0 or None, got {burn_in!r}")
    if burn_in >= steps:
        raise ValueError(f"burn_in must be < steps = {steps}, got {burn_in}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    return steps, repeats, burn_in, seed


def _warn_precision(value: float, se: float, steps: int, burn_in: int, repeats: int) -> None:
    short = []
    if repeats < MIN_REPEATS:
        short.append(f"repeats = {repeats} < {MIN_REPEATS}")
    if steps - burn_in < MIN_STEPS:
        short.append(f"steps - burn_in = {steps - burn_in} < {MIN_STEPS}")
    if short:
        warnings.warn(
            f"lyapunov_exponent: {' and '.join(short)} is too small for a meaningful "
            f"estimate: gamma = {value:.4g} +- {se:.3g} (standard error over {repeats} "
            f"run(s) of {steps - burn_in} averaged steps; NaN: not estimable from one run). "
            "Increase steps and repeats.",
            LyapunovPrecisionWarning,
            stacklevel=3,
        )


def _evaluate_many(
    prob: _Problem, lrs: list[float], b: float, steps: int, repeats: int, burn_in: int,
    seed: int, method: str,
) -> list[LyapunovEstimate]:  # fmt: skip
    """gamma at every learning rate: exact ones one by one, the rest in one batched run."""
    out: list[LyapunovEstimate | None] = [None] * len(lrs)
    if method != "monte_carlo" or prob.cc.rank == 0:
        for j, lr in enumerate(lrs):
            ex = prob.exact(lr, b)
            if ex is not None:
                out[j] = LyapunovEstimate(ex[0], 0.0, 0, 0, 0, True, ex[1], prob.n)
            elif method == "exact":
                raise ValueError(
                    "method='exact' needs commuting Jacobians without momentum (diagonal or "
                    "simultaneously diagonalisable curvature, an enumerable batch "
                    "distribution) or batch_size = n; use method='auto' or 'monte_carlo'"
                )
    todo = [j for j, e in enumerate(out) if e is None]
    if todo:
        res = prob.monte_carlo([lrs[j] for j in todo], b, steps, burn_in, repeats, seed)
        for j, (value, se) in zip(todo, res, strict=True):
            out[j] = LyapunovEstimate(value, se, steps, repeats, burn_in, False, "monte_carlo",
                                      prob.n)  # fmt: skip
    return out  # type: ignore[return-value]


def _evaluate(
    prob: _Problem, lr: float, b: float, steps: int, repeats: int, burn_in: int, seed: int,
    method: str,
) -> LyapunovEstimate:  # fmt: skip
    return _evaluate_many(prob, [lr], b, steps, repeats, burn_in, seed, method)[0]


def lyapunov_exponent(
    curvature: torch.Tensor | CoefficientCurvature,
    lr: float,
    batch_size: float,
    n: int | None = None,
    *,
    sampling: str = "bernoulli",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    steps: int = 1000,
    repeats: int = 16,
    seed: int | None = None,
    burn_in: int | None = None,
    kind: str = "auto",
    method: str = "auto",
) -> LyapunovEstimate:
    r"""Top Lyapunov exponent gamma of linearized SGD: the growth rate of a *typical* run.

    gamma = lim (1/k) log ||J_hat_k ... J_hat_1 w_0|| (almost surely) with
    J_hat = I - eta H_hat (I + (rho/alpha) H) and heavy-ball momentum on (w_t, w_{t-1}). A
    typical run diverges iff gamma > 0. This is not the mean-square notion of
    :func:`mean_square_rate`: always gamma <= (1/2) log rho(T), and rho(T) > 1 with
    gamma < 0 is common (heavy-tailed products; see the module docstring).

    Exact (``exact=True``, no sampling) for commuting curvature without momentum
    (gamma = max over invariant coordinates of E log|j|), for B = n (log of the spectral
    radius of the fixed Jacobian) and for zero curvature (0); otherwise the Monte-Carlo
    estimator of the module docstring on the coefficient space (r <= m C).

    Args:
        curvature: (m, d, d) Hessians, (m, C, d) factors, (m, C, m, C) Gram, (m, d)
            diagonals with ``kind="diagonal"``, or a :class:`CoefficientCurvature`.
        lr: learning rate eta > 0.
        batch_size: B in (0, n] (an integer for ``"without_replacement"``).
        n: data-set size the m curvatures stand for (default m; see the module docstring).
        sampling: ``"bernoulli"`` or ``"without_replacement"``.
        momentum: heavy-ball beta in [0, 1).
        sam_rho: SAM radius rho (None: plain SGD).
        sam_alpha: SAM normaliser alpha > 0.
        steps: steps per Monte-Carlo run, burn-in included (>= 1).
        repeats: independent Monte-Carlo runs (>= 1), propagated together.
        seed: seed of the private generator (None: nondeterministic).
        burn_in: steps discarded before averaging (default steps // 5).
        kind: curvature form, see :func:`as_coefficient_curvature`.
        method: ``"auto"`` (exact where possible), ``"exact"`` (error where not possible)
            or ``"monte_carlo"`` (the estimator even where an exact value exists; zero
            curvature stays exact).

    Returns:
        A :class:`LyapunovEstimate` (value in natural-log units per step, standard error).

    Warns:
        LyapunovPrecisionWarning: fewer than :data:`MIN_REPEATS` repeats or
            :data:`MIN_STEPS` averaged steps in a Monte-Carlo estimate (the message quotes
            the standard error).
    """
    lr = check_positive("lr", lr)
    if method not in LYAPUNOV_METHODS:
        raise ValueError(f"method must be one of {LYAPUNOV_METHODS}, got {method!r}")
    steps, repeats, burn_in, seed = _check_protocol(steps, repeats, burn_in, seed)
    prob = _prepare(curvature, n, sampling, momentum, sam_rho, sam_alpha, kind)
    b = _check_batch(batch_size, prob.n, prob.sampling)
    est = _evaluate(prob, lr, b, steps, repeats, burn_in, seed, method)
    if not est.exact:
        _warn_precision(est.value, est.stderr, steps, burn_in, repeats)
    return est


# --------------------------------------------------------------------------- critical values


def _root(f: Callable[[float], float], lo: float, hi: float, rel_tol: float) -> float:
    """Geometric bisection for f(x) = 0 with f(lo) <= 0 < f(hi) (either orientation)."""
    flo = f(lo) > 0
    for _ in range(200):
        if max(lo, hi) / min(lo, hi) - 1 <= rel_tol:
            break
        mid = math.sqrt(lo * hi)
        if (f(mid) > 0) == flo:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


class _Cached:
    """gamma_hat(x) and stderr with every evaluation kept (common random numbers).

    ``fn_many(xs)`` evaluates a list of points at once (one batched Monte-Carlo run).
    """

    def __init__(self, fn_many: Callable[[list[float]], list[LyapunovEstimate]]):
        self.fn_many = fn_many
        self.memo: dict[float, LyapunovEstimate] = {}

    def many(self, xs: list[float]) -> None:
        todo = sorted({x for x in xs if x not in self.memo})
        if todo:
            self.memo.update(zip(todo, self.fn_many(todo), strict=True))

    def __call__(self, x: float) -> LyapunovEstimate:
        self.many([x])
        return self.memo[x]

    def shifted(self, z: float) -> Callable[[float], float]:
        def g(x: float) -> float:
            e = self(x)
            return e.value + z * _se(e)

        return g


def _se(e: LyapunovEstimate) -> float:
    """The standard error that the critical values use (0 when exact or not estimable)."""
    return 0.0 if e.exact or not math.isfinite(e.stderr) else e.stderr


#: Largest factor by which the search for a typical critical learning rate widens the
#: first bracket around the full-batch GD limit, each way: a root more than 4^12 (about
#: 1.7e7) away from it is reported as 0.0 or inf.
_EXPAND_LIMIT = 4.0**12

#: Factors of 2 by which one round of the bracket search widens at once (batched).
_WIDEN_BATCH = 4


class _LrSearch:
    """Roots of g_z(eta) = gamma_hat(eta) + z stderr(eta) for several z, batched by round.

    Every round collects the learning rates that all unresolved roots need and evaluates
    them in one batched Monte-Carlo run (:meth:`_Cached.many`).

    1. Bracket: start from eta0 / 2, eta0, 2 eta0 and widen by factors of 2 (down while
       g_z > 0 everywhere, up while g_z <= 0 everywhere; :data:`_WIDEN_BATCH` factors per
       round) until some pair of neighbouring points has g_z(a) <= 0 < g_z(b); of several
       such pairs the one nearest eta0 is kept. None found within :data:`_EXPAND_LIMIT`:
       inf (g_z <= 0 everywhere) or 0.0.
    2. Refine: interpolation on log eta (quadratic through the bracket and the nearest other
       evaluated point, :meth:`_interpolate`; linear without one) with guards: the two
       points x / (1 + t), x (1 + t) around the interpolated root x, t = rel_tol / 2.2, are
       evaluated, so that a good interpolation closes the bracket to a ratio below
       1 + rel_tol in one round; when the previous round did not halve the bracket (in log)
       the two points that split it in three (geometrically) are added (trisection
       safeguard, at least a third per round). Stops when b / a - 1 <= rel_tol.

    The central root (z = 0) is solved first; the others start from its linear prediction
    (:meth:`_predictions`). The answer is the interpolated root inside the final bracket
    (its geometric midpoint when an end is infinite).
    """

    def __init__(self, gam: _Cached, eta0: float, zs: tuple[float, ...], rel_tol: float):
        self.gam, self.eta0, self.zs, self.rel_tol = gam, eta0, zs, rel_tol
        self.t = rel_tol / 2.2  # (1 + t)^2 < 1 + rel_tol: two guards close the bracket

    def g(self, z: float, x: float) -> float:
        e = self.gam.memo[x]
        return e.value + z * _se(e)

    def _bracket(self, z: float) -> tuple[float, float] | None:
        xs = sorted(self.gam.memo)
        pairs = [(a, b) for a, b in pairwise(xs) if self.g(z, a) <= 0 < self.g(z, b)]
        if not pairs:
            return None
        return min(pairs, key=lambda p: abs(math.log(math.sqrt(p[0] * p[1]) / self.eta0)))

    def _widen(self, z: float) -> list[float] | None:
        """The next points of the bracket search for z (the next :data:`_WIDEN_BATCH`
        factors of 2 beyond the evaluated range, all in one round), or None when the search
        is exhausted."""
        xs = sorted(self.gam.memo)
        if all(self.g(z, x) > 0 for x in xs):
            nxt = [xs[0] / 2.0**k for k in range(1, _WIDEN_BATCH + 1)]
            nxt = [x for x in nxt if x >= self.eta0 / _EXPAND_LIMIT * (1 - 1e-12)]
        else:
            nxt = [xs[-1] * 2.0**k for k in range(1, _WIDEN_BATCH + 1)]
            nxt = [x for x in nxt if x <= self.eta0 * _EXPAND_LIMIT * (1 + 1e-12)]
        return nxt or None

    def _interpolate(self, z: float, a: float, b: float) -> float:
        """The root inside the bracket [a, b] of the interpolant in u = log eta: the
        quadratic through (a, b) and the evaluated point nearest to the bracket when there
        is one (it has exactly one root in [a, b], g_z changing sign there), else linear."""
        ga, gb = self.g(z, a), self.g(z, b)
        if not (math.isfinite(ga) and math.isfinite(gb)) or gb == ga:
            return math.sqrt(a * b)
        frac = min(max(ga / (ga - gb), 0.0), 1.0)
        out = [x for x in self.gam.memo if (x < a or x > b) and math.isfinite(self.g(z, x))]
        if not out:
            return a * (b / a) ** frac
        c = min(out, key=lambda x: abs(math.log(x / math.sqrt(a * b))))
        ua, ub, uc, gc = math.log(a), math.log(b), math.log(c), self.g(z, c)
        # Newton form g = ga + s1 (u - ua) + s2 (u - ua) (u - ub)
        s1 = (gb - ga) / (ub - ua)
        s2 = ((gc - ga) / (uc - ua) - s1) / (uc - ub)
        # in t = u - ua: s2 t^2 + (s1 - s2 (ub - ua)) t + ga = 0
        qa, qb, w = s2, s1 - s2 * (ub - ua), ub - ua
        roots = [frac * w] if abs(qa) * w < 1e-12 * abs(qb) else None
        if roots is None:
            disc = qb * qb - 4.0 * qa * ga
            if disc < 0:
                return a * (b / a) ** frac
            sq = math.sqrt(disc)
            roots = [(-qb + sq) / (2 * qa), (-qb - sq) / (2 * qa)]
        inside = [t for t in roots if 0.0 <= t <= w]
        if not inside:
            return a * (b / a) ** frac
        return math.exp(ua + min(inside, key=lambda t: abs(t - frac * w)))

    def solve(self) -> list[float]:
        """The roots for every z: the central one (z = 0) first, then the others seeded
        with their linear prediction from it."""
        self.gam.many([self.eta0 / 2.0, self.eta0, 2.0 * self.eta0])
        result: dict[float, float] = {}
        if 0.0 in self.zs:
            self._solve((0.0,), result, [])
        rest = tuple(z for z in self.zs if z not in result)
        self._solve(rest, result, self._predictions(rest, result.get(0.0, math.nan)))
        return [result.get(z, math.nan) for z in self.zs]

    def _predictions(self, zs: tuple[float, ...], root: float) -> list[float]:
        """Guarded linear predictions of the roots of g_z from the central root.

        Near the root g_0 ~ s log(eta / root) (s the slope over the final bracket), so
        g_z = 0 at about root exp(-z se / s); the prediction and the guards
        x / (1 + t), x (1 + t) are evaluated together, which closes each bracket in one
        round when the prediction is good (the band is then as rigorous as any root).
        """
        if not zs or not (math.isfinite(root) and root > 0):
            return []
        br = self._bracket(0.0)
        if br is None:
            return []
        a, b = br
        ga, gb = self.g(0.0, a), self.g(0.0, b)
        slope = (gb - ga) / math.log(b / a) if b > a else math.nan
        se = self.stderr_at(root)
        if not (math.isfinite(slope) and slope > 0 and se > 0):
            return []
        out = []
        for z in zs:
            x = root * math.exp(-z * se / slope)
            out += [x / (1.0 + self.t), x, x * (1.0 + self.t)]
        return out

    def _solve(self, zs: tuple[float, ...], result: dict[float, float], seed: list[float]):
        last: dict[float, float] = {}
        if seed:
            self.gam.many(seed)
        for _ in range(400):
            need: list[float] = []
            for z in zs:
                if z in result:
                    continue
                br = self._bracket(z)
                if br is None:
                    nxt = self._widen(z)
                    if nxt is None:
                        all_neg = all(self.g(z, x) <= 0 for x in self.gam.memo)
                        result[z] = math.inf if all_neg else 0.0
                    else:
                        need += nxt
                    continue
                a, b = br
                if b / a - 1.0 <= self.rel_tol:
                    result[z] = self._interpolate(z, a, b)
                    continue
                x = self._interpolate(z, a, b)
                cand = [x / (1.0 + self.t), x * (1.0 + self.t)]
                width = math.log(b / a)
                if z in last and width > 0.5 * last[z]:  # trisection safeguard
                    cand += [a * (b / a) ** (1 / 3), a * (b / a) ** (2 / 3)]
                last[z] = width
                need += [c for c in cand if a < c < b]
                if not any(a < c < b for c in cand):
                    need.append(math.sqrt(a * b))
            if not need:
                break
            self.gam.many(need)

    def stderr_at(self, x: float) -> float:
        """Standard error at x: interpolated between the evaluated neighbours (log eta)."""
        xs = sorted(self.gam.memo)
        below = [p for p in xs if p <= x]
        above = [p for p in xs if p >= x]
        if not below or not above:
            return _se(self.gam.memo[min(xs, key=lambda p: abs(math.log(p / x)))])
        a, b = below[-1], above[0]
        sa, sb = _se(self.gam.memo[a]), _se(self.gam.memo[b])
        if a == b:
            return sa
        frac = math.log(x / a) / math.log(b / a)
        return sa + frac * (sb - sa)


def critical_lr_typical(
    curvature: torch.Tensor | CoefficientCurvature,
    batch_size: float,
    n: int | None = None,
    *,
    sampling: str = "bernoulli",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    steps: int = 1000,
    repeats: int = 16,
    seed: int | None = None,
    burn_in: int | None = None,
    kind: str = "auto",
    rel_tol: float = 1e-3,
    band: bool = True,
) -> TypicalCriticalLR:
    """Learning rate at which the top Lyapunov exponent gamma crosses 0 (typical divergence).

    Every evaluation of gamma uses the same seed (common random numbers: the same batches
    and starts), so gamma_hat(eta) is continuous in eta, and the learning rates of one
    search round are evaluated together in one batched Monte-Carlo run (each gets exactly
    the estimate :func:`lyapunov_exponent` gives it alone, up to rounding). Starting from
    the full-batch GD limit eta_GD = 2 (1 + beta) / (lambda_1 (1 + (rho/alpha) lambda_1)),
    a bracket is found (eta_GD / 2, eta_GD, 2 eta_GD, then widened by factors of 2, four per
    round, up to 4^12 each way) and closed by guarded quadratic interpolation on log eta
    with a trisection safeguard to relative width ``rel_tol`` (see :class:`_LrSearch`). A
    root more than 4^12 from eta_GD is reported as 0.0 or inf. With ``band``
    the same is done, in the same rounds, for gamma_hat + 2 stderr and gamma_hat - 2 stderr,
    whose roots are ``lr_low`` and ``lr_high``: the standard error's effect on the answer
    (they mostly fall inside brackets the central root needs anyway); ``band=False``
    solves the central root only and reports ``lr_low = lr_high = lr``. gamma is not
    monotone in eta in general (it dips to -inf where a factor 1 - eta x can vanish); the
    root returned is one crossing inside the bracket. Since gamma <= (1/2) log rho(T), the
    result is never below :func:`critical_lr_exact` (up to the estimator's error). ``inf``
    for zero curvature.

    Cost: on a 64-example probe Gram (C = 10, r = 576) with a probe's protocol (200 steps,
    4 repeats, rel_tol 2e-2) the central root takes 2-4 batched runs of 4-12 learning rates
    in all; the band needs more: pass ``band=False`` when only ``lr`` is used (timings:
    ``benchmarks/bench_dynamics.py``, docs/reproducing.md).
    ``stderr`` is interpolated between the evaluated neighbours of the root. Arguments as
    in :func:`lyapunov_exponent`.
    """
    steps, repeats, burn_in, seed = _check_protocol(steps, repeats, burn_in, seed)
    rel_tol = check_positive("rel_tol", rel_tol)
    prob = _prepare(curvature, n, sampling, momentum, sam_rho, sam_alpha, kind)
    b = _check_batch(batch_size, prob.n, prob.sampling)
    if prob.cc.rank == 0:
        return TypicalCriticalLR(math.inf, math.inf, math.inf, 0.0, True, steps, repeats, seed, 0)
    lam = prob.top_eigenvalue()
    eta0 = 2.0 * (1.0 + prob.beta) / (lam * (1.0 + prob.q * lam))
    gam = _Cached(lambda etas: _evaluate_many(prob, etas, b, steps, repeats, burn_in, seed, "auto"))
    zs = (0.0, 2.0, -2.0) if band else (0.0,)
    search = _LrSearch(gam, eta0, zs, rel_tol)
    out = search.solve()
    if not band:
        out = [out[0], out[0], out[0]]
    exact = all(e.exact for e in gam.memo.values())
    crit = out[0]
    se = search.stderr_at(crit) if math.isfinite(crit) and crit > 0 else 0.0
    if not exact and math.isfinite(crit) and crit > 0:
        _warn_precision(0.0, se, steps, burn_in, repeats)
    return TypicalCriticalLR(crit, out[1], out[2], se, exact, steps, repeats, seed,
                             len(gam.memo))  # fmt: skip


def critical_batch_size_typical(
    curvature: torch.Tensor | CoefficientCurvature,
    lr: float,
    n: int | None = None,
    *,
    sampling: str = "bernoulli",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    steps: int = 1000,
    repeats: int = 16,
    seed: int | None = None,
    burn_in: int | None = None,
    kind: str = "auto",
    rel_tol: float = 1e-3,
) -> TypicalCriticalBatchSize:
    """Batch size at which gamma crosses 0: smaller batches diverge for a typical run.

    The search runs over B in [1, n]: continuous (geometric bisection to ``rel_tol``) for
    Bernoulli sampling, over integers without replacement (the smallest integer B with
    gamma_hat(B) <= 0). Common random numbers as in :func:`critical_lr_typical` (with
    n = m the Bernoulli batches are nested in B, the without-replacement batches too).
    Returns ``inf`` when gamma > 0 even at B = n (full batch diverges: no batch size
    helps), 0.0 when gamma <= 0 already at B = 1. ``batch_size_low`` / ``batch_size_high``
    are the same crossings of gamma_hat - 2 stderr and gamma_hat + 2 stderr. Arguments as in
    :func:`lyapunov_exponent`.
    """
    lr = check_positive("lr", lr)
    steps, repeats, burn_in, seed = _check_protocol(steps, repeats, burn_in, seed)
    rel_tol = check_positive("rel_tol", rel_tol)
    prob = _prepare(curvature, n, sampling, momentum, sam_rho, sam_alpha, kind)
    nn = prob.n
    if prob.cc.rank == 0:
        return TypicalCriticalBatchSize(0.0, 0.0, 0.0, math.nan, True, steps, repeats, seed, 0)
    gam = _Cached(
        lambda bs: [_evaluate(prob, lr, x, steps, repeats, burn_in, seed, "auto") for x in bs]
    )
    integer = prob.sampling == "without_replacement"
    out = []
    for z in (0.0, -2.0, 2.0):
        g = gam.shifted(z)
        if g(float(nn)) > 0:
            out.append(math.inf)
            continue
        if g(1.0) <= 0:
            out.append(0.0)
            continue
        lo, hi = 1.0, float(nn)  # g(lo) > 0 >= g(hi)
        if integer:
            while hi - lo > 1:
                mid = float((int(lo) + int(hi)) // 2)
                if g(mid) > 0:
                    lo = mid
                else:
                    hi = mid
            out.append(hi)
        else:
            out.append(_root(g, lo, hi, rel_tol))
    crit = out[0]
    exact = all(e.exact for e in gam.memo.values())
    if 0 < crit < math.inf:
        est = gam(crit)
        se = 0.0 if est.exact else est.stderr
        if not est.exact:
            _warn_precision(est.value, se, steps, burn_in, repeats)
    else:
        se = math.nan
    return TypicalCriticalBatchSize(crit, out[1], out[2], se, exact, steps, repeats, seed,
                                    len(gam.memo))  # fmt: skip


# -------------------------------------------------------------------------- verdicts, demo


def stability_verdict(rho: float, gamma: LyapunovEstimate | float, z: float = 2.0) -> str:
    """One sentence naming which notion of stability fails (for reports and warnings).

    * gamma > 0 (beyond ``z`` standard errors): "typically unstable: a typical run of the
      linearized dynamics diverges" (a statement about the linear model, which the Section 5
      simulations confirm; for real training see ``docs/warnings.md``);
    * gamma < 0 and rho(T) > 1: "mean-square unstable: fluctuations grow without bound
      although most runs still settle";
    * gamma < 0 and rho(T) <= 1: "stable";
    * |gamma| within ``z`` standard errors of 0: "borderline".
    """
    if isinstance(gamma, LyapunovEstimate):
        g, se = gamma.value, (0.0 if gamma.exact or math.isnan(gamma.stderr) else gamma.stderr)
    else:
        g, se = float(gamma), 0.0
    gtxt = f"gamma = {g:+.4g}" + (f" +- {se:.2g}" if se else "") + " per step"
    rtxt = f"rho(T) = {rho:.4g}"
    if g - z * se > 0:
        return (f"typically unstable: a typical run of the linearized dynamics diverges "
                f"({gtxt} > 0; {rtxt})")  # fmt: skip
    if g + z * se >= 0:
        return (f"borderline: the sign of the typical growth rate is not resolved ({gtxt}); "
                f"{rtxt}" + (" > 1: mean-square divergent" if rho > 1 else ""))  # fmt: skip
    if rho > 1:
        return (f"mean-square unstable: fluctuations grow without bound although most runs "
                f"still settle ({rtxt} > 1: E||w_k||^2 diverges; {gtxt} < 0: a typical run "
                f"shrinks)")  # fmt: skip
    return f"stable: typical runs and the mean square both contract ({rtxt} <= 1, {gtxt} < 0)"
