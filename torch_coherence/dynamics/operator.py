r"""Exact mean-square stability of linearized SGD: the spectral radius of the second-moment map.

One step of linearized SGD (paper 000, Definition 1; docs/theory.md §1) is w <- J_hat w with

    J_hat = I - eta H_hat P,   H_hat = (1/B) sum_{i in batch} H_i,   P = I + (rho/alpha) H,

(P = I for SGD; P != I is SAM, paper 002 Theorem C.8). The second moment M_k = E[w_k w_k^T]
evolves linearly, M_{k+1} = T(M_k) with (docs/theory.md §5)

    T(M) = J M J^T + eta^2 E[D P M P D],   J = I - eta H P,   D = H_hat - H,

and E||J_hat_k ... J_hat_1||_F^2 = tr T^k(I). The linearized dynamics diverge in mean square
exactly when rho(T) > 1. The noise term for a data set of n samples and batch size B:

* Bernoulli sampling (each i in the batch independently with p = B/n): the indicators are
  independent with variance p (1 - p), so
  E[D X D] = (1/B^2) p (1 - p) sum_i H_i X H_i = (1/B - 1/n) mean_i H_i X H_i.
* B out of n without replacement: P(i in batch) = p = B/n and, for i != j,
  P(i, j in batch) = q = B (B - 1) / (n (n - 1)). Then
  E[X_S M X_S] = p sum_i H_i M H_i + q sum_{i != j} H_i M H_j with X_S = sum_{i in S} H_i;
  subtracting E[X_S] M E[X_S] = p^2 n^2 H M H and using p - q = B (n - B) / (n (n - 1)),
  q - p^2 = -B (n - B) / (n^2 (n - 1)) gives
  E[D X D] = (n - B) / (B (n - 1)) (mean_i H_i X H_i - H X H),
  a (scaled) covariance, so the map stays positive.

When the m curvatures given are a probe standing for a data set of n > m samples, mean_i runs
over the probe (docs/theory.md §5). The map leaves the orthogonal complement of the joint range V of
the H_i alone, so it is computed on V (dimension r <= m C, from
:mod:`torch_coherence.dynamics.curvature_space`), never on the d x d parameter space.

Heavy-ball momentum beta: the state is z_t = (w_t, w_{t-1}), z_{t+1} = A_hat z_t with
A_hat = [[(1 + beta) I - eta H_hat P, -beta I], [I, 0]]; the noise enters only the (w_t, w_t)
block. T is then the map on the 2r x 2r second moments E[z z^T].

T is a positive map (it maps PSD matrices to PSD matrices), so rho(T) is an eigenvalue with a
PSD eigenvector (Krein-Rutman). For diagonal curvature T splits into one small block per pair
of coordinates (a, b); a PSD eigenvector has a non-zero diagonal block, so rho(T) is the
largest spectral radius of the per-coordinate blocks (a, a): a closed form without momentum.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .._validation import (
    check_momentum,
    check_nonnegative,
    check_positive,
    check_sample_count,
)
from ..linalg import lanczos
from .curvature_space import CoefficientCurvature, as_coefficient_curvature

__all__ = [
    "SAMPLINGS",
    "NonMonotoneRateWarning",
    "critical_batch_size_exact",
    "critical_lr_exact",
    "mean_square_rate",
    "sampling_coefficients",
]

#: Accepted values of every ``sampling`` argument.
SAMPLINGS = ("bernoulli", "without_replacement")

#: Accepted values of the ``method`` argument of :func:`mean_square_rate`.
RATE_METHODS = ("auto", "closed_form", "dense", "matrix_free")

#: Largest state dimension (r, or 2 r with momentum) handled by the dense Kronecker matrix
#: under ``method="auto"``.
DENSE_MAX_STATE = 24

F64 = torch.float64


class NonMonotoneRateWarning(UserWarning):
    """rho(T) crossed 1 more than once on the search bracket of a critical value."""


def check_sampling(sampling: object) -> str:
    """Validate a ``sampling`` name."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    return str(sampling)


def sampling_coefficients(batch_size: float, n: int, sampling: str) -> tuple[float, float]:
    """(a, b) with E[D X D] = a mean_i H_i X H_i - b H X H (see the module docstring).

    Bernoulli: a = 1/B - 1/n, b = 0. Without replacement: a = b = (n - B) / (B (n - 1)),
    and 0 for n = 1.
    """
    sampling = check_sampling(sampling)
    if sampling == "bernoulli":
        return 1.0 / batch_size - 1.0 / n, 0.0
    if n == 1:
        return 0.0, 0.0
    a = (n - batch_size) / (batch_size * (n - 1))
    return a, a


def _validate(
    curvature: object, lr: object, batch_size: object, n: object, sampling: object, kind: str
) -> tuple[CoefficientCurvature, float, float, int, str]:
    cc = as_coefficient_curvature(curvature, kind)
    lr = check_positive("lr", lr)
    n = cc.m if n is None else check_sample_count("n", n)
    if n < cc.m:
        raise ValueError(
            f"n must be >= the number of curvature samples ({cc.m}): n is the data-set "
            f"size they stand for, got {n}"
        )
    b = check_positive("batch_size", batch_size)
    if b > n:
        raise ValueError(f"batch_size must lie in (0, n] = (0, {n}], got {b}")
    return cc, lr, b, n, check_sampling(sampling)


def _sam_q(sam_rho: object | None, sam_alpha: object) -> float:
    alpha = check_positive("sam_alpha", sam_alpha)
    if sam_rho is None:
        return 0.0
    return check_nonnegative("sam_rho", sam_rho) / alpha


def _diagonal_rate(D: torch.Tensor, lr: float, a: float, b: float, beta: float, q: float) -> float:
    """max over coordinates of the per-coordinate block's spectral radius (module docstring)."""
    Hm = D.mean(0)
    P = 1.0 + q * Hm
    jac = 1.0 - lr * Hm * P
    noise = lr**2 * P**2 * (a * (D**2).mean(0) - b * Hm**2)
    if beta == 0.0:
        return float((jac**2 + noise).abs().max())
    # per coordinate: z = (w_t, w_{t-1}), second moments (x11, x12, x21, x22) row-major
    k = jac.numel()
    A = torch.zeros(k, 2, 2, dtype=F64)
    A[:, 0, 0] = jac + beta
    A[:, 0, 1] = -beta
    A[:, 1, 0] = 1.0
    T = torch.einsum("kij,klm->kiljm", A, A).reshape(k, 4, 4).clone()
    T[:, 0, 0] += noise
    return float(torch.linalg.eigvals(T).abs().max())


def _operator_parts(
    cc: CoefficientCurvature, lr: float, a: float, b: float, beta: float, q: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T(X) = A X A^T + sum_k w_k L_k X L_k^T on the state space; returns (A, L, w)."""
    h = cc.hessians()
    m, r, _ = h.shape
    H = h.mean(0)
    eye = torch.eye(r, dtype=F64)
    P = eye + q * H
    hp = h @ P
    Ls = [lr * hp]
    ws = [torch.full((m,), a / m, dtype=F64)]
    if b != 0.0:
        Ls.append((lr * H @ P).unsqueeze(0))
        ws.append(torch.tensor([-b], dtype=F64))
    L = torch.cat(Ls)
    w = torch.cat(ws)
    J = eye - lr * H @ P
    if beta == 0.0:
        return J, L, w
    A = torch.zeros(2 * r, 2 * r, dtype=F64)
    A[:r, :r] = J + beta * eye
    A[:r, r:] = -beta * eye
    A[r:, :r] = eye
    Lp = torch.zeros(L.shape[0], 2 * r, 2 * r, dtype=F64)
    Lp[:, :r, :r] = L
    return A, Lp, w


def second_moment_map(
    A: torch.Tensor, L: torch.Tensor, w: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """X -> A X A^T + sum_k w_k L_k X L_k^T on symmetric matrices (X symmetrised first)."""

    def apply(X: torch.Tensor) -> torch.Tensor:
        X = 0.5 * (X + X.T)
        LX = torch.einsum("kij,jl,kml->kim", L, X, L)
        return A @ X @ A.T + torch.einsum("k,kij->ij", w, LX)

    return apply


def _dense_rate(A: torch.Tensor, L: torch.Tensor, w: torch.Tensor) -> float:
    s = A.shape[0]
    # row-major vec: vec(A X B^T) = (A kron B) vec(X)
    T = torch.kron(A, A) + torch.einsum("k,kij,klm->iljm", w, L, L).reshape(s * s, s * s)
    return float(torch.linalg.eigvals(T).abs().max())


def _matrix_free_rate(A: torch.Tensor, L: torch.Tensor, w: torch.Tensor, tol: float) -> float:
    from scipy.sparse.linalg import LinearOperator, eigs

    s = A.shape[0]
    apply = second_moment_map(A, L, w)

    def mv(x: np.ndarray) -> np.ndarray:
        X = torch.from_numpy(np.ascontiguousarray(x.reshape(s, s).real)).to(F64)
        return apply(X).reshape(-1).numpy()

    op = LinearOperator((s * s, s * s), matvec=mv, dtype=np.float64)
    v0 = np.eye(s).reshape(-1)
    vals = eigs(
        op, k=1, which="LM", v0=v0, tol=tol, ncv=min(s * s - 1, 40), return_eigenvectors=False
    )
    return float(np.abs(vals).max())


def _symmetrised(cc: CoefficientCurvature, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, mu): factors in the eigenbasis of H with SAM folded in, and H's eigenvalues there.

    With P = I + q H, P^(1/2) J_hat P^(-1/2) = I - eta P^(1/2) H_hat P^(1/2) is symmetric:
    SAM is SGD on the Hessians P^(1/2) H_i P^(1/2) (same rho(T)), whose factors are
    G_i V P^(1/2) and whose mean has the eigenvalues mu (1 + q mu).
    """
    Hm = cc.mean_hessian()
    mu, V = torch.linalg.eigh(0.5 * (Hm + Hm.T))
    mu = mu.clamp_min(0)
    G = cc.factors @ (V * (1.0 + q * mu).sqrt())
    return G, mu * (1.0 + q * mu)


def _noise_product(G: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """M -> sum_i G_i^T (G_i M G_i^T) G_i = sum_i h_i M h_i, as one (r, m c) x (m c, r) product.

    Costs O(m c r^2), not the O(m r^3) of forming the h_i.
    """
    m, c, r = G.shape
    flat = G.reshape(m * c, r)

    def apply(M: torch.Tensor) -> torch.Tensor:
        inner = (G @ M) @ G.transpose(1, 2)  # (m, c, c)
        return flat.T @ (inner @ G).reshape(m * c, r)

    return apply


def _self_adjoint_rate(
    cc: CoefficientCurvature, lr: float, a: float, b: float, q: float, tol: float
) -> float:
    """rho(T) without momentum by Lanczos on symmetric r x r matrices, factor-form products.

    In the symmetrised form (:func:`_symmetrised`) J_hat is symmetric, so for
    <N, M> = tr(N M), <N, T(M)> = E tr(N J_hat M J_hat) = <T(N), M>: T is self-adjoint in
    the trace inner product and maps the PSD cone into itself, so rho(T) is its largest
    eigenvalue (Krein-Rutman) and Lanczos applies. In the eigenbasis of H, J and H act
    entrywise on M.
    """
    G, mu = _symmetrised(cc, q)
    m, _, r = G.shape
    eye = torch.eye(r, dtype=F64)
    jj = torch.outer(1.0 - lr * mu, 1.0 - lr * mu)
    hh = torch.outer(mu, mu)
    noise = _noise_product(G)
    ca, cb = lr * lr * a / m, lr * lr * b

    def matvec(v: torch.Tensor) -> torch.Tensor:
        M = v.reshape(r, r)
        M = 0.5 * (M + M.T)
        out = jj * M + ca * noise(M)
        if cb:
            out = out - cb * (hh * M)
        return out.reshape(-1)

    res = lanczos(
        matvec, eye.reshape(-1), tol=tol, max_iter=min(r * (r + 1) // 2, 500), stop="value"
    )
    return float(res.value)


def _critical_lr_self_adjoint(
    cc: CoefficientCurvature, a: float, b: float, q: float, rel_tol: float
) -> float | None:
    r"""The exact mean-square critical learning rate without momentum, as one eigenproblem.

    In the symmetrised eigenbasis (:func:`_symmetrised`),
    T(eta) = I - eta L + eta^2 N with L(M) = (mu_a + mu_b) M_ab (entrywise, positive
    definite: mu > 0 on the coefficient space) and
    N(M) = (1 - b) mu_a mu_b M_ab + (a/m) sum_i h_i M h_i, both self-adjoint in the trace
    inner product. rho(T) is the largest eigenvalue of T (module docstring), so
    rho(T) >= 1 iff max_M <M, (eta^2 N - eta L) M> >= 0 iff eta mu_max >= 1, where
    mu_max = max_M <M, N M> / <M, L M> is the top eigenvalue of L^(-1/2) N L^(-1/2):

        eta_c = 1 / mu_max,   rho(T) < 1 for every eta < eta_c and >= 1 above.

    So rho(T) = 1 has exactly one positive root, found by one Lanczos run (relative
    accuracy ``rel_tol`` on mu_max, hence on eta_c) instead of a bisection over rho(T).
    None (the caller then bisects) when mu_max <= 0 (a sampling whose noise is not a
    covariance, B < 1) or when round-off left an eigenvalue of H at 0.
    """
    G, mu = _symmetrised(cc, q)
    if float(mu.min()) <= 0.0:  # round-off left H singular on V: L is not invertible
        return None
    m, _, r = G.shape
    root = (mu[:, None] + mu[None, :]).rsqrt()  # L^(-1/2), entrywise
    hh = torch.outer(mu, mu) * (1.0 - b)
    noise = _noise_product(G)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        X = v.reshape(r, r)
        M = root * (0.5 * (X + X.T))
        return (root * (hh * M + (a / m) * noise(M))).reshape(-1)

    start = torch.diag((2.0 * mu).sqrt())  # L^(1/2) I: the fixed point of T at eta = 0
    res = lanczos(matvec, start.reshape(-1), tol=max(rel_tol, 1e-15),
                  max_iter=min(r * (r + 1) // 2, 500), stop="value")  # fmt: skip
    top = float(res.value)
    return 1.0 / top if top > 0 else None


def _critical_lr_diagonal(D: torch.Tensor, a: float, b: float, q: float) -> float:
    """Closed form without momentum: each coordinate's (1 - eta mu)^2 + eta^2 nu equals 1 at
    eta = 2 mu / (mu^2 + nu) (mu = H_aa P_aa, nu = P_aa^2 (a mean_i D_ia^2 - b H_aa^2)), and
    rho(T) is their maximum (module docstring), so eta_c is the smallest of these."""
    Hm = D.mean(0)
    P = 1.0 + q * Hm
    mu = Hm * P
    nu = P**2 * (a * (D**2).mean(0) - b * Hm**2)
    return float((2.0 * mu / (mu**2 + nu)).min())


def _rate(
    cc: CoefficientCurvature,
    lr: float,
    batch_size: float,
    n: int,
    sampling: str,
    beta: float,
    q: float,
    method: str,
    tol: float,
) -> float:
    a, b = sampling_coefficients(batch_size, n, sampling)
    if method == "auto":
        if cc.diagonal is not None:
            method = "closed_form"
        else:
            state = cc.rank * (2 if beta else 1)
            method = "dense" if state <= DENSE_MAX_STATE else "matrix_free"
    if method == "closed_form":
        if cc.diagonal is None:
            raise ValueError("method='closed_form' needs diagonal curvature")
        used = cc.diagonal[:, cc.diagonal.max(0).values > 0]
        return _diagonal_rate(used, lr, a, b, beta, q)
    if method == "matrix_free" and beta == 0.0:
        return _self_adjoint_rate(cc, lr, a, b, q, tol)
    A, L, w = _operator_parts(cc, lr, a, b, beta, q)
    if method == "dense" or A.shape[0] ** 2 <= 3:
        return _dense_rate(A, L, w)
    return _matrix_free_rate(A, L, w, tol)


def mean_square_rate(
    curvature: torch.Tensor | CoefficientCurvature,
    lr: float,
    batch_size: float,
    n: int | None = None,
    *,
    sampling: str = "bernoulli",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    kind: str = "auto",
    method: str = "auto",
    tol: float = 1e-10,
) -> float:
    r"""Spectral radius rho(T) of the second-moment map of linearized SGD (docs/theory.md §5).

    T(M) = E[J_hat M J_hat^T] with J_hat = I - eta H_hat (I + (rho/alpha) H) (see the module
    docstring for the noise coefficients of both samplings and the momentum state). The
    linearized dynamics diverge in mean square (E||w_k||^2 -> infinity) iff rho(T) > 1; this
    is the exact answer of which paper 000's Theorem 1 is a sufficient condition.

    Args:
        curvature: (m, d, d) Hessians, (m, C, d) factors, (m, C, m, C) Gram, (m, d)
            diagonals with ``kind="diagonal"``, or a :class:`CoefficientCurvature`.
        lr: learning rate eta > 0.
        batch_size: B, 0 < B <= n (real values allowed: the formulas are continuous in B).
        n: data-set size the m curvatures stand for (default m).
        sampling: ``"bernoulli"`` or ``"without_replacement"``.
        momentum: heavy-ball beta in [0, 1).
        sam_rho: SAM radius rho (None: plain SGD).
        sam_alpha: SAM normaliser alpha > 0 (1 for unnormalised SAM).
        kind: curvature form, see :func:`as_coefficient_curvature`.
        method: ``"closed_form"`` (diagonal curvature), ``"dense"`` (Kronecker matrix on the
            coefficient space, for small r), ``"matrix_free"`` (Arnoldi on symmetric
            matrices, scipy ``eigs``) or ``"auto"``.
        tol: relative tolerance of the matrix-free eigensolver.

    Returns:
        rho(T) as a float (1.0 when the curvature has an empty range).
    """
    cc, lr, b, n, sampling = _validate(curvature, lr, batch_size, n, sampling, kind)
    beta = check_momentum(momentum)
    q = _sam_q(sam_rho, sam_alpha)
    if method not in RATE_METHODS:
        raise ValueError(f"method must be one of {RATE_METHODS}, got {method!r}")
    if cc.rank == 0:
        return 1.0
    return _rate(cc, lr, b, n, sampling, beta, q, method, tol)


def _bisect_crossing(
    f: Callable[[float], float], lo: float, hi: float, *, log: bool, rel_tol: float
) -> float:
    """x in [lo, hi] with f(x) = 1, f(lo) < 1 <= f(hi); bisection (geometric if ``log``)."""
    for _ in range(200):
        mid = math.sqrt(lo * hi) if log else 0.5 * (lo + hi)
        if f(mid) < 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= rel_tol * hi:
            break
    return 0.5 * (lo + hi)


def _check_monotone(f: Callable[[float], float], lo: float, hi: float, what: str, log: bool):
    grid = np.geomspace(lo, hi, 17) if log else np.linspace(lo, hi, 17)
    above = [f(float(x)) >= 1.0 for x in grid]
    crossings = sum(1 for u, v in itertools.pairwise(above) if u != v)
    if crossings > 1:
        warnings.warn(
            f"rho(T) is not monotone in {what} on [{lo:.4g}, {hi:.4g}]: it crosses 1 "
            f"{crossings} times on a 17-point grid; the returned value is one crossing",
            NonMonotoneRateWarning,
            stacklevel=3,
        )


def critical_lr_exact(
    curvature: torch.Tensor | CoefficientCurvature,
    batch_size: float,
    n: int | None = None,
    *,
    sampling: str = "bernoulli",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    kind: str = "auto",
    rel_tol: float = 1e-12,
) -> float:
    """Learning rate eta at which rho(T) = 1: the exact mean-square critical learning rate.

    Without momentum (SGD and SAM, both samplings) this is one eigenproblem, not a search:
    T(eta) = I - eta L + eta^2 N with self-adjoint L > 0 and N, so rho(T) = 1 has the single
    root eta_c = 1 / lambda_max(L^(-1/2) N L^(-1/2)) (derivation in
    :func:`_critical_lr_self_adjoint`), solved by Lanczos to relative accuracy ``rel_tol``
    (closed form for diagonal curvature). Measured on a 64-example probe Gram of a digits
    MLP (C = 10, r = 576, one thread): about 2 s (``benchmarks/bench_dynamics.py``).

    With momentum the bracket is (0, eta_GD] with eta_GD the full-batch GD limit
    2 (1 + beta) / (lambda_1 (1 + (rho/alpha) lambda_1)) (docs/theory.md §4): at eta_GD the
    mean part alone has rho(J kron J) >= 1 and T dominates it on the PSD cone, while
    rho(T) < 1 for small eta. Bisection to relative tolerance ``rel_tol``, each rho(T) to
    a tenth of it; a :class:`NonMonotoneRateWarning` is issued when rho(T) crosses 1 more
    than once on a 17-point grid of the bracket. ``inf`` for zero curvature.
    """
    cc, _, b, n, sampling = _validate(curvature, 1.0, batch_size, n, sampling, kind)
    beta = check_momentum(momentum)
    q = _sam_q(sam_rho, sam_alpha)
    rel_tol = check_positive("rel_tol", rel_tol)
    if cc.rank == 0:
        return math.inf
    a, bb = sampling_coefficients(b, n, sampling)
    if beta == 0.0:
        if cc.diagonal is not None:
            used = cc.diagonal[:, cc.diagonal.max(0).values > 0]
            return _critical_lr_diagonal(used, a, bb, q)
        eta = _critical_lr_self_adjoint(cc, a, bb, q, rel_tol)
        if eta is not None:
            return eta
    lam = float(torch.linalg.eigvalsh(cc.mean_hessian())[-1])
    hi = 2.0 * (1.0 + beta) / (lam * (1.0 + q * lam)) * (1.0 + 1e-9)
    lo = hi * 1e-9
    inner = max(0.1 * rel_tol, 1e-12)  # the eigensolver need not beat the bisection

    def f(eta: float) -> float:
        return _rate(cc, eta, b, n, sampling, beta, q, "auto", inner)

    # rho(T) -> 1 as eta -> 0 with momentum (the eigenvalue 1 of the momentum map): only a
    # tight solve tells 1 - O(eta) from 1 at the bottom of the bracket
    if _rate(cc, lo, b, n, sampling, beta, q, "auto", 1e-12) >= 1.0:
        return lo
    _check_monotone(f, lo * 1e6, hi, "lr", log=True)
    return _bisect_crossing(f, lo, hi, log=True, rel_tol=rel_tol)


def critical_batch_size_exact(
    curvature: torch.Tensor | CoefficientCurvature,
    lr: float,
    n: int | None = None,
    *,
    sampling: str = "bernoulli",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    kind: str = "auto",
    rel_tol: float = 1e-12,
) -> float:
    """Batch size B at which rho(T) = 1: smaller batches diverge in mean square.

    The noise coefficients decrease in B for both samplings, so rho(T) is expected to
    decrease in B; bisection runs over the continuous B in [1, n] (the formulas are continuous
    in B). Returns ``inf`` when even B = n (full batch) has rho(T) >= 1 (no batch size helps)
    and 0.0 when rho(T) < 1 already at B = 1 (no batch size diverges).
    Warns (:class:`NonMonotoneRateWarning`) if rho(T) crosses 1 more than once on the bracket.
    """
    cc, lr, _, n, sampling = _validate(curvature, lr, 1.0, n, sampling, kind)
    beta = check_momentum(momentum)
    q = _sam_q(sam_rho, sam_alpha)
    if cc.rank == 0:
        return 0.0

    def g(bs: float) -> float:
        return _rate(cc, lr, bs, n, sampling, beta, q, "auto", 1e-12)

    hi, lo = float(n), 1.0
    if g(hi) >= 1.0:
        return math.inf
    if g(lo) < 1.0:
        return 0.0
    _check_monotone(lambda x: 2.0 - g(x), lo, hi, "batch_size", log=True)
    # g decreasing: find B with g(B) = 1 via h = 2 - g increasing
    return _bisect_crossing(lambda x: 2.0 - g(x), lo, hi, log=True, rel_tol=rel_tol)
