"""Symmetric eigen-solvers: the one home of eigenvalue code in torch-coherence.

Three ways to get the largest eigenvalue of a symmetric matrix (or of a symmetric linear
operator given only through matrix-vector products):

* ``"exact"``: dense symmetric eigensolver (``torch.linalg.eigvalsh``), O(n^3).
* ``"lanczos"``: the Lanczos process with full re-orthogonalisation
  (Golub & Van Loan, *Matrix Computations*, 4th ed., Alg. 10.1.1); converges in far fewer
  products than power iteration, which matters when each product is a Hessian-vector
  product.
* ``"power"``: power iteration with a Rayleigh-quotient estimate. For an entrywise
  non-negative matrix such as the coherence matrix S it converges to the Perron root from
  the all-ones start vector.

``"auto"`` uses ``"exact"`` up to :data:`AUTO_EXACT_MAX` rows and Lanczos above.
All reductions are carried out in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO_EXACT_MAX",
    "EIG_METHODS",
    "EigResult",
    "LANCZOS_STOPS",
    "lanczos",
    "power_iteration",
    "resolve_eig_method",
    "symmetric_eigh",
    "symmetric_min_eigenvalue",
    "top_eigenvalue",
]

#: Matrices up to this many rows are handled by the dense eigensolver under ``"auto"``.
AUTO_EXACT_MAX = 2048

#: The accepted values of every ``eig_method`` argument.
EIG_METHODS = ("auto", "exact", "lanczos", "power")

#: The stopping rules of :func:`lanczos`.
LANCZOS_STOPS = ("residual", "value")

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EigResult:
    """Largest eigenpair of a symmetric operator.

    Attributes:
        value: the largest (algebraic) eigenvalue.
        vector: a unit eigenvector (float64), or ``None`` when not requested.
        matvecs: number of operator applications used (0 for the dense solver).
        residual: ``||A v - value v||`` of the returned pair (0 for the dense solver).
        converged: whether the requested tolerance was met.
    """

    value: float
    vector: torch.Tensor | None
    matvecs: int
    residual: float
    converged: bool


def resolve_eig_method(eig_method: str, size: int) -> str:
    """Validate ``eig_method`` and resolve ``"auto"`` for a matrix with ``size`` rows.

    ``"auto"`` becomes ``"exact"`` up to :data:`AUTO_EXACT_MAX` rows and ``"lanczos"``
    above.
    """
    if eig_method not in EIG_METHODS:
        raise ValueError(f"eig_method must be one of {EIG_METHODS}, got {eig_method!r}")
    if eig_method == "auto":
        return "exact" if size <= AUTO_EXACT_MAX else "lanczos"
    return eig_method


def lanczos(
    matvec: Matvec,
    v0: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    stop: str = "residual",
) -> EigResult:
    """Largest eigenpair of a symmetric operator by Lanczos with full re-orthogonalisation.

    After j steps the Krylov basis Q_j and tridiagonal T_j satisfy
    A Q_j = Q_j T_j + beta_j q_{j+1} e_j^T, so a Ritz pair (theta, Q_j s) has residual
    ``r = |beta_j s_j|`` (Golub & Van Loan, §10.1.4). The iteration stops when the
    Krylov space is exhausted, after ``max_iter`` products, or by the rule ``stop``:

    * ``"residual"``: ``r <= tol * |theta|`` (the Ritz vector is accurate).
    * ``"value"``: the *eigenvalue* is accurate: both the Temple-type estimate
      ``min(r, r^2 / (theta_1 - theta_2))`` of its error (Parlett, *The Symmetric Eigenvalue
      Problem*, §11.7; theta_2 the second Ritz value standing in for the unknown gap) and
      the last change of theta are at most ``tol * |theta|`` (from the second product on).
      The eigenvalue error is about r^2 / gap, so this needs markedly fewer products than
      ``"residual"``, most of all from a good (warm) start vector. Like every a-posteriori
      rule it can be fooled by a plateau on a lower eigenvalue when the start vector has
      almost no component along the top eigenvector; requiring the change of theta to be
      small as well guards against the common case of a plateau still moving.

    Args:
        matvec: ``v -> A v`` for a symmetric A; receives and must return a 1-D tensor of
            the same length (any floating dtype; computation is float64).
        v0: start vector (e.g. the previous top eigenvector for a warm start).
        tol: relative residual tolerance.
        max_iter: the largest number of products.
        stop: the stopping rule, ``"residual"`` or ``"value"`` (see above).

    Returns:
        :class:`EigResult` with the top Ritz value, its Ritz vector (float64) and the count of
        products.
    """
    if v0.dim() != 1 or v0.numel() == 0:
        raise ValueError(f"v0 must be a non-empty 1-D tensor, got shape {tuple(v0.shape)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if stop not in LANCZOS_STOPS:
        raise ValueError(f"stop must be one of {LANCZOS_STOPS}, got {stop!r}")
    q = v0.detach().to(torch.float64)
    nrm = torch.linalg.vector_norm(q)
    if not torch.isfinite(nrm) or nrm == 0:
        raise ValueError("v0 must be finite and non-zero")
    q = q / nrm
    dim = q.numel()
    steps = min(max_iter, dim)
    # the Krylov basis, preallocated: one (steps, dim) buffer and views of its first rows
    basis = torch.empty(steps, dim, dtype=torch.float64, device=q.device)
    basis[0] = q
    alphas: list[float] = []
    betas: list[float] = []
    theta, s, residual, converged = 0.0, torch.ones(1, dtype=torch.float64), math.inf, False
    for j in range(steps):
        w = matvec(basis[j]).detach().to(torch.float64).reshape(-1)
        if w.numel() != dim:
            raise ValueError(f"matvec returned {w.numel()} entries for a vector of {dim}")
        alphas.append(float(w @ basis[j]))
        Q = basis[: j + 1]
        # two passes of classical Gram-Schmidt keep the basis orthogonal to working precision
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = float(torch.linalg.vector_norm(w))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        previous, theta, s = theta, float(evals[-1]), evecs[:, -1]
        residual = abs(beta * float(s[-1]))
        scale = tol * max(abs(theta), torch.finfo(torch.float64).tiny)
        if stop == "residual":
            error = residual
        elif j == 0:
            error = math.inf
        else:
            gap = theta - float(evals[-2])
            temple = residual * residual / gap if gap > 0 else math.inf
            error = max(min(residual, temple), abs(theta - previous))
        if error <= scale:
            converged = True
            break
        if beta <= 1e-14 * max(abs(theta), 1.0):  # invariant subspace found: exact
            converged = True
            break
        if j + 1 == dim:
            converged = True
            break
        if j + 1 == steps:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    vec = basis[: s.numel()].T @ s
    vec = vec / torch.linalg.vector_norm(vec)
    return EigResult(theta, vec, len(alphas), residual, converged)


def power_iteration(
    matvec: Matvec,
    v0: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 100_000,
) -> EigResult:
    """Dominant eigenpair of a symmetric PSD operator by power iteration.

    The estimate is the Rayleigh quotient theta_k = v_k^T A v_k of the normalised iterate;
    iteration stops when the residual ``||A v - theta v||`` is at most ``tol * theta``
    (for a symmetric matrix the eigenvalue error is then at most tol^2 theta^2 / gap).
    Only the dominant eigenvalue in modulus is found, so the operator should be PSD or
    entrywise non-negative (Perron-Frobenius), as every operator in this package is.
    """
    v = v0.detach().to(torch.float64).reshape(-1)
    nrm = torch.linalg.vector_norm(v)
    if not torch.isfinite(nrm) or nrm == 0:
        raise ValueError("v0 must be finite and non-zero")
    v = v / nrm
    theta, residual, converged, products = 0.0, math.inf, False, 0
    while products < max_iter:
        products += 1
        w = matvec(v).detach().to(torch.float64).reshape(-1)
        theta = float(v @ w)
        residual = float(torch.linalg.vector_norm(w - theta * v))
        if residual <= tol * max(abs(theta), torch.finfo(torch.float64).tiny):
            converged = True
            break
        wn = torch.linalg.vector_norm(w)
        if wn == 0:  # A v = 0: the operator is zero on this start vector
            converged = True
            break
        v = w / wn
    return EigResult(theta, v, products, residual, converged)


def _dense_matrix(matrix: torch.Tensor, name: str) -> torch.Tensor:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(matrix.shape)}")
    return matrix.to(torch.float64)


def top_eigenvalue(
    matrix: torch.Tensor,
    *,
    eig_method: str = "auto",
    tol: float = 1e-10,
    v0: torch.Tensor | None = None,
    max_iter: int | None = None,
    name: str = "matrix",
) -> EigResult:
    """Largest eigenvalue of a dense symmetric matrix with the chosen method.

    Args:
        matrix: (n, n) symmetric matrix.
        eig_method: ``"exact"``, ``"lanczos"``, ``"power"`` or ``"auto"``.
        tol: relative tolerance of the iterative methods.
        v0: start vector of the iterative methods (default: all ones, which is the right
            start for the Perron root of a non-negative matrix).
        max_iter: most products of the iterative methods (default: n for Lanczos, capped
            at 300; 100000 for power iteration).
        name: the argument name used in error messages.
    """
    A = _dense_matrix(matrix, name)
    n = A.shape[0]
    eig_method = resolve_eig_method(eig_method, n)
    if eig_method == "exact" or n <= 2:
        evals, evecs = torch.linalg.eigh(A)
        return EigResult(float(evals[-1]), evecs[:, -1], 0, 0.0, True)
    start = torch.ones(n, dtype=torch.float64) if v0 is None else v0
    if eig_method == "lanczos":
        res = lanczos(lambda x: A @ x, start, tol=tol, max_iter=max_iter or min(n, 300))
    else:
        res = power_iteration(lambda x: A @ x, start, tol=tol, max_iter=max_iter or 100_000)
    if not res.converged:
        warnings.warn(
            f"{eig_method} did not reach relative tolerance {tol} on {name} "
            f"(residual {res.residual:.3g} after {res.matvecs} products)",
            RuntimeWarning,
            stacklevel=2,
        )
    return res


def symmetric_min_eigenvalue(matrix: torch.Tensor) -> float:
    """Smallest eigenvalue of a dense symmetric matrix (float64, dense solver)."""
    return float(torch.linalg.eigvalsh(_dense_matrix(matrix, "matrix"))[0])


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a dense symmetric matrix, robustly.

    ``torch.linalg.eigh`` (LAPACK ``syevd``, divide and conquer) can fail to converge on
    matrices with large clusters of (nearly) equal eigenvalues and raises ``LinAlgError``
    (seen on the Gram of rotated Section 5.1 factors); SciPy's ``eigh`` with the ``evr``
    driver (MRRR) and then ``ev`` (QR iteration) is tried before giving up.
    """
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError as first:
        import numpy as np
        import scipy.linalg

        a = matrix.detach().cpu().numpy()
        for driver in ("evr", "ev"):
            try:
                w, v = scipy.linalg.eigh(a, driver=driver)
            except np.linalg.LinAlgError:
                continue
            return (
                torch.from_numpy(w).to(matrix.device, matrix.dtype),
                torch.from_numpy(v).to(matrix.device, matrix.dtype),
            )
        raise first
