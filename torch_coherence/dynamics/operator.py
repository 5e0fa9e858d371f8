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


def _pair_coefficients(mu: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(ell, qq) with 1 - kappa_ab(eta) = eta ell_ab - eta^2 qq_ab, entrywise over pairs (a, b).

    In the eigenbasis of H (eigenvalues mu; SAM folded in, :func:`_symmetrised`) the mean
    part of T acts on the pair (a, b) of a second moment through the 4 x 4 matrix
    A_a (x) A_b, A_a = [[c_a, -beta], [1, 0]], c_a = 1 + beta - eta mu_a (on
    (w_t, w_{t-1}); without momentum the 1 x 1 j_a j_b). Solving x = e_0 + (A_a (x) A_b) x
    for the (w_t, w_t) entry x_0 = phi_ab = sum_k (A_a^k)_00 (A_b^k)_00 gives
    phi_ab = 1 / (1 - kappa_ab) with

        kappa_ab = c_a c_b + beta^2 - beta (c_a^2 + c_b^2 - 2 beta c_a c_b) / (1 - beta^2),

    a quadratic in eta that equals 1 at eta = 0:
    ell_ab = (1 - beta) (mu_a + mu_b),
    qq_ab = ((1 + beta^2) mu_a mu_b - beta (mu_a^2 + mu_b^2)) / (1 - beta^2)
    (beta = 0: ell = mu_a + mu_b, qq = mu_a mu_b, i.e. 1 - j_a j_b). phi_ab is finite while
    every direction is stable (eta mu_max < 2 (1 + beta)) and positive near eta = 0, so
    1 - kappa_ab > 0 on that whole interval (it cannot cross 0 without phi_ab diverging).
    """
    ms, mm = mu[:, None] + mu[None, :], torch.outer(mu, mu)
    sq = mu[:, None] ** 2 + mu[None, :] ** 2
    return (1.0 - beta) * ms, ((1.0 + beta**2) * mm - beta * sq) / (1.0 - beta**2)


def _top_generalized(
    weight: torch.Tensor,
    apply: Callable[[torch.Tensor], torch.Tensor],
    rel_tol: float,
    start: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """(lambda_max, unit eigenvector as a symmetric r x r matrix) of W^(-1/2) N W^(-1/2) on
    symmetric matrices, W entrywise > 0 and N self-adjoint in the trace inner product.

    Lanczos on the packed upper triangle (off-diagonal entries times sqrt(2), so that the
    Euclidean inner product of packed vectors is tr(X Y)): half the memory of full r x r
    vectors for its basis. Default start W^(1/2) I; pass the previous eigenvector for a
    warm start.
    """
    r = weight.shape[0]
    root = weight.rsqrt()
    iu, ju = torch.triu_indices(r, r)
    scale = torch.full(iu.shape, math.sqrt(2.0), dtype=F64)  # float64: an exact isometry
    scale[iu == ju] = 1.0

    def unpack(v: torch.Tensor) -> torch.Tensor:
        X = torch.zeros(r, r, dtype=F64)
        X[iu, ju] = v / scale
        X[ju, iu] = v / scale
        return X

    def matvec(v: torch.Tensor) -> torch.Tensor:
        Y = root * apply(root * unpack(v))
        return 0.5 * (Y[iu, ju] + Y[ju, iu]) * scale

    if start is None:
        start = torch.diag(torch.diagonal(weight).sqrt())
    res = lanczos(matvec, start[iu, ju] * scale, tol=max(rel_tol, 1e-15),
                  max_iter=min(r * (r + 1) // 2, 500), stop="value")  # fmt: skip
    return float(res.value), unpack(res.vector)


def _critical_lr_self_adjoint(
    cc: CoefficientCurvature, a: float, b: float, q: float, rel_tol: float, beta: float = 0.0
) -> float | None:
    r"""The exact mean-square critical learning rate as one eigenproblem (momentum beta).

    T = B + N splits into the mean part B (pairwise 4 x 4 blocks, :func:`_pair_coefficients`)
    and the noise N(X) = eta^2 ((a/m) sum_i h_i X h_i - b H X H), which only reads and writes
    the (w_t, w_t) block X. Both are positive maps; for rho(B) < 1, rho(B + N) < 1 iff
    rho((I - B)^(-1) N) < 1 (regular splitting on the PSD cone), and on the (w_t, w_t)
    block (I - B)^(-1) N is X -> phi (.) N(X), phi_ab > 0. Its spectral radius is below 1 iff
    eta^2 N_1 < Phi^(-1) = eta ell - eta^2 qq as self-adjoint maps on symmetric matrices
    (N_1 = N / eta^2), i.e. iff eta (qq + N_1) < ell:

        eta_c = 1 / mu_max,  mu_max = lambda_max(L^(-1/2) (qq + N_1) L^(-1/2)),

    L(X) = ell (.) X. rho(T) < 1 for every eta < eta_c and >= 1 above: one Lanczos run
    (relative accuracy ``rel_tol``) instead of a search over rho(T). eta_c is below the
    full-batch limit 2 (1 + beta) / mu_max(H) automatically (there 1 - kappa_aa = 0 while
    N_1 >= 0 on e_a e_a^T). Without momentum ell = mu_a + mu_b and qq = mu_a mu_b.
    None (the caller then bisects) when mu_max <= 0 or round-off left an eigenvalue of H at 0.
    """
    G, mu = _symmetrised(cc, q)
    if float(mu.min()) <= 0.0:  # round-off left H singular on V: L is not invertible
        return None
    m = G.shape[0]
    ell, qq = _pair_coefficients(mu, beta)
    qq = qq - b * torch.outer(mu, mu)
    noise = _noise_product(G)
    top = _top_generalized(ell, lambda M: qq * M + (a / m) * noise(M), rel_tol)[0]
    return 1.0 / top if top > 0 else None


def _critical_batch_self_adjoint(
    cc: CoefficientCurvature, lr: float, n: int, sampling: str, q: float, beta: float,
    rel_tol: float,
) -> float | None:  # fmt: skip
    r"""The exact mean-square critical batch size as one eigenproblem.

    With eta fixed, the noise is eta^2 a(B) N_x with N_x(X) = mean_i h_i X h_i (Bernoulli)
    or mean_i h_i X h_i - H X H (without replacement, a = b), and a(B) decreases in B
    (:func:`sampling_coefficients`). As in :func:`_critical_lr_self_adjoint`, rho(T) < 1 iff
    every direction is stable (D = eta ell - eta^2 qq > 0 entrywise) and
    eta^2 a(B) N_x < D, i.e. a(B) < a* = 1 / (eta^2 lambda_max(D^(-1/2) N_x D^(-1/2))).
    Bernoulli: a = 1/B - 1/n, so B_c = 1 / (a* + 1/n); without replacement:
    a = (n - B) / (B (n - 1)), so B_c = n / (1 + a* (n - 1)). ``inf`` when D is not positive
    (no batch size helps: the full batch diverges), None when H is singular on V.
    """
    G, mu = _symmetrised(cc, q)
    if float(mu.min()) <= 0.0:
        return None
    ell, qq = _pair_coefficients(mu, beta)
    D = lr * ell - lr * lr * qq
    if float(D.min()) <= 0.0:
        return math.inf
    m = G.shape[0]
    noise = _noise_product(G)
    mm = torch.outer(mu, mu)
    cov = sampling == "without_replacement"

    def apply(M: torch.Tensor) -> torch.Tensor:
        out = noise(M) / m
        return out - mm * M if cov else out

    top = lr * lr * _top_generalized(D, apply, rel_tol)[0]
    if top <= 0.0 or (cov and n == 1):
        return 0.0
    a_star = 1.0 / top
    if cov:
        return n / (1.0 + a_star * (n - 1))
    return 1.0 / (a_star + 1.0 / n)


def _momentum_rate(
    cc: CoefficientCurvature, lr: float, a: float, b: float, beta: float, q: float, tol: float
) -> float:
    r"""rho(T) with heavy-ball momentum from the reduced (w_t, w_t) problem, matrix-free.

    T = B + N as in :func:`_critical_lr_self_adjoint`, with B the mean step (pairwise
    4 x 4 blocks A_a (x) A_b in the eigenbasis of H, A_a = [[c_a, -beta], [1, 0]],
    c_a = 1 + beta - eta mu_a) and N the noise on the (w_t, w_t) block. For lambda above
    rho(B) = max_a rho(A_a)^2, lambda is an eigenvalue of T with PSD eigenvector iff 1 is the
    top eigenvalue of (lambda - B)^(-1) N, which on the (w_t, w_t) block is X -> phi (.) N(X)
    with 1 / phi_ab = W_ab(lambda), solving lambda x = e_0 + (A_a (x) A_b) x:

        W = lambda - c_a c_b - beta^2 / lambda
            + beta (lambda (c_a^2 + c_b^2) - 2 beta c_a c_b) / (lambda^2 - beta^2),

    positive for lambda > rho(B). theta(lambda) = lambda_max(W^(-1/2) N W^(-1/2)) decreases
    in lambda (positive maps), so rho(T) is the root of theta = 1 (rho(B) when theta <= 1
    just above rho(B)). Safeguarded Newton on 1 / theta - 1 with
    d theta / d lambda = -theta <u, (dW/dlambda) (.) u>, u = W^(-1/2) v for the unit Lanczos
    vector v (generalized-eigenvalue perturbation), each theta by warm-started Lanczos
    (factor-form noise, O(m C r^2) per product, r x r blocks of memory: never the
    (2 r)^2 x (2 r)^2 matrix nor the per-sample 2 r x 2 r Jacobians).
    """
    G, mu = _symmetrised(cc, q)
    m = G.shape[0]
    c = 1.0 + beta - lr * mu
    disc = c * c - 4.0 * beta
    rad = torch.where(disc >= 0, 0.5 * (c.abs() + disc.clamp_min(0).sqrt()),
                      torch.full_like(c, math.sqrt(beta)))  # fmt: skip
    rb = float(rad.max()) ** 2
    if a == 0.0 and b == 0.0:  # no noise (B = n): T = A (x) A
        return rb
    p, s2 = torch.outer(c, c), c[:, None] ** 2 + c[None, :] ** 2
    mm = torch.outer(mu, mu)
    noise = _noise_product(G)
    ca, cb = lr * lr * a / m, lr * lr * b

    def apply(M: torch.Tensor) -> torch.Tensor:
        out = ca * noise(M)
        return out - cb * (mm * M) if cb else out

    def weight(lam: float) -> torch.Tensor:
        return lam - p - beta**2 / lam + beta * (lam * s2 - 2 * beta * p) / (lam**2 - beta**2)

    def slope(lam: float) -> torch.Tensor:
        d = lam**2 - beta**2
        return 1 + beta**2 / lam**2 + beta * (4 * beta * p * lam - s2 * (lam**2 + beta**2)) / d**2

    vec = None

    def g(lam: float) -> tuple[float, float]:
        """(1/theta - 1, its derivative) at lambda."""
        nonlocal vec
        W = weight(lam)
        theta, vec = _top_generalized(W, apply, 0.1 * tol, vec)
        if theta <= 0.0:
            return math.inf, 0.0
        u = vec * W.rsqrt()
        dtheta = -theta * float((slope(lam) * u * u).sum())
        return 1.0 / theta - 1.0, -dtheta / theta**2

    lo, hi = rb, math.inf  # g(lo) < 0 (or lo = rho(B)), g(hi) > 0
    lam = 1.0 if rb < 1.0 else 2.0 * rb
    for _ in range(100):
        val, der = g(lam)
        if val < 0:
            lo = lam
        else:
            hi = lam
        step = lam - val / der if der > 0 and math.isfinite(val) else math.nan
        if math.isfinite(step) and abs(step - lam) <= tol * lam and lo < step <= hi * (1 + tol):
            return step
        if math.isfinite(hi) and (hi - lo <= tol * hi or hi - rb <= tol * max(rb, 1e-300)):
            return 0.5 * (lo + hi)
        if math.isfinite(step) and lo < step < hi:
            lam = step
        elif math.isinf(hi):
            lam = rb + 2.0 * (lam - rb)
        else:
            lam = 0.5 * (lo + hi)
    warnings.warn(
        f"mean_square_rate: the momentum root search did not reach tol = {tol:g} in 100 "
        f"steps; returning rho(T) ~ {lam:.10g} (bracket [{lo:.10g}, {hi:.10g}])",
        RuntimeWarning,
        stacklevel=4,
    )
    return lam


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
    if method == "matrix_free" and cc.rank > 1:
        return _momentum_rate(cc, lr, a, b, beta, q, tol)
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
            coefficient space, for small r), ``"matrix_free"`` (without momentum: Lanczos on
            symmetric r x r matrices; with momentum: the reduced (w_t, w_t) problem of
            :func:`_momentum_rate`, Newton on lambda with warm-started Lanczos; both in
            factor form, r x r blocks of memory) or ``"auto"``.
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

    One eigenproblem, not a search, for SGD, SAM and heavy-ball momentum with both samplings:
    rho(T) < 1 iff eta (Q + N_1) < L as self-adjoint maps on symmetric matrices, with L and Q
    entrywise multipliers from the pairwise mean step and N_1 the noise map (derivation in
    :func:`_critical_lr_self_adjoint`), so rho(T) = 1 has the single root
    eta_c = 1 / lambda_max(L^(-1/2) (Q + N_1) L^(-1/2)), solved by Lanczos to relative
    accuracy ``rel_tol`` (closed form for diagonal curvature without momentum). Measured on
    a 64-example probe Gram of a digits MLP (C = 10, r = 576, one thread): see
    ``benchmarks/bench_dynamics.py`` and docs/reproducing.md.

    Fallback (the mean Hessian singular on the coefficient space through round-off): bisection
    on (0, eta_GD], eta_GD = 2 (1 + beta) / (lambda_1 (1 + (rho/alpha) lambda_1)) the
    full-batch GD limit (docs/theory.md §4), to relative tolerance ``rel_tol`` (at least
    1e-9), each rho(T) to a tenth of it, with a :class:`NonMonotoneRateWarning` when rho(T)
    crosses 1 more than once on a 17-point grid of the bracket. ``inf`` for zero curvature.
    """
    cc, _, b, n, sampling = _validate(curvature, 1.0, batch_size, n, sampling, kind)
    beta = check_momentum(momentum)
    q = _sam_q(sam_rho, sam_alpha)
    rel_tol = check_positive("rel_tol", rel_tol)
    if cc.rank == 0:
        return math.inf
    a, bb = sampling_coefficients(b, n, sampling)
    if beta == 0.0 and cc.diagonal is not None:
        used = cc.diagonal[:, cc.diagonal.max(0).values > 0]
        return _critical_lr_diagonal(used, a, bb, q)
    eta = _critical_lr_self_adjoint(cc, a, bb, q, rel_tol, beta)
    if eta is not None:
        return eta
    lam = float(torch.linalg.eigvalsh(cc.mean_hessian())[-1])
    hi = 2.0 * (1.0 + beta) / (lam * (1.0 + q * lam)) * (1.0 + 1e-9)
    lo = hi * 1e-9
    outer = max(rel_tol, 1e-9)
    inner = 0.1 * outer  # the eigensolver need not beat the bisection

    def f(eta: float) -> float:
        return _rate(cc, eta, b, n, sampling, beta, q, "auto", inner)

    # rho(T) -> 1 as eta -> 0 with momentum (the eigenvalue 1 of the momentum map): only a
    # tight solve tells 1 - O(eta) from 1 at the bottom of the bracket
    if _rate(cc, lo, b, n, sampling, beta, q, "auto", 1e-12) >= 1.0:
        return lo
    _check_monotone(f, lo * 1e6, hi, "lr", log=True)
    return _bisect_crossing(f, lo, hi, log=True, rel_tol=outer)


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

    One eigenproblem (:func:`_critical_batch_self_adjoint`): the noise is eta^2 a(B) N_x with
    a(B) decreasing in B, and rho(T) < 1 iff a(B) < a* = 1 / (eta^2 lambda_max(D^(-1/2) N_x
    D^(-1/2))), D the entrywise mean-step multiplier; the B with a(B) = a* is returned
    (continuous in B, relative accuracy ``rel_tol`` on a*). Returns ``inf`` when even B = n
    (full batch) has rho(T) >= 1 (no batch size helps) and 0.0 when rho(T) < 1 already at
    B = 1 (no batch size diverges). Fallback (mean Hessian singular on the coefficient space
    through round-off): bisection over B in [1, n] to relative tolerance ``rel_tol`` (at
    least 1e-9), with a :class:`NonMonotoneRateWarning` if rho(T) crosses 1 more than once.
    """
    cc, lr, _, n, sampling = _validate(curvature, lr, 1.0, n, sampling, kind)
    beta = check_momentum(momentum)
    q = _sam_q(sam_rho, sam_alpha)
    rel_tol = check_positive("rel_tol", rel_tol)
    if cc.rank == 0:
        return 0.0
    bc = _critical_batch_self_adjoint(cc, lr, n, sampling, q, beta, rel_tol)
    if bc is not None:
        return 0.0 if bc <= 1.0 else bc
    outer = max(rel_tol, 1e-9)

    def g(bs: float) -> float:
        return _rate(cc, lr, bs, n, sampling, beta, q, "auto", 0.1 * outer)

    hi, lo = float(n), 1.0
    if g(hi) >= 1.0:
        return math.inf
    if g(lo) < 1.0:
        return 0.0
    _check_monotone(lambda x: 2.0 - g(x), lo, hi, "batch_size", log=True)
    # g decreasing: find B with g(B) = 1 via h = 2 - g increasing
    return _bisect_crossing(lambda x: 2.0 - g(x), lo, hi, log=True, rel_tol=outer)
