r"""The Hessian coherence measure sigma and the matrix S.

Definition 2 of paper 000 (docs/theory.md §2): for PSD per-sample Hessians H_1, ..., H_n

.. math::

    S_{ij} = \| H_i^{1/2} H_j^{1/2} \|_F = \sqrt{\operatorname{tr}(H_i H_j)}, \qquad
    \sigma = \frac{\lambda_1(S)}{\max_i \lambda_1(H_i)} .

The trace form follows from ``||X||_F^2 = tr(X^T X)`` and the cyclic trace, so no matrix
square root is ever formed. S is symmetric and entrywise non-negative; lambda_1(S) is its
Perron root. sigma >= 1 always (lambda_1(S) >= S_ii = ||H_i||_F >= lambda_1(H_i)).

Three entry points take the curvature in three forms and all end in
:func:`coherence_from_gram` or the same final reduction:

* :func:`coherence_from_hessians`: dense (n, d, d) Hessians.
* :func:`coherence_from_factors`: factors A_i (n, C, d) with H_i = A_i^T A_i (docs/theory.md §3).
* :func:`coherence_from_gram`: the block Gram K_ij = A_i A_j^T, (n, C, n, C) or (n, n).

With factors, tr(H_i H_j) = ||K_ij||_F^2, lambda_1(H_i) = lambda_1(K_ii) and
lambda_1((1/n) sum_i H_i) = lambda_1(K) / n, so no d x d matrix is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._validation import check_finite_tensor, default_tol
from .linalg import resolve_eig_method, top_eigenvalue

__all__ = [
    "CoherenceStats",
    "UndefinedCoherenceError",
    "coherence_from_factors",
    "coherence_from_gram",
    "coherence_from_hessians",
]


class UndefinedCoherenceError(ValueError):
    """Raised when sigma is undefined because every per-sample curvature is zero."""


@dataclass(frozen=True)
class CoherenceStats:
    """Coherence of a set of per-sample Hessians (paper 000, Definition 2).

    Attributes:
        sigma: the coherence measure lambda_1(S) / max_i lambda_1(H_i); 1 <= sigma.
        lambda_S: lambda_1(S), the Perron root of S.
        max_sample_sharpness: max_i lambda_1(H_i).
        sharpness: lambda_1 of the mean Hessian (1/n) sum_i H_i.
        n: the number of per-sample Hessians the numbers refer to.
        S: the (n, n) float64 matrix S_ij = sqrt(tr(H_i H_j)).
        eig_method: the eigen-solver that produced lambda_S and sharpness.
    """

    sigma: float
    lambda_S: float
    max_sample_sharpness: float
    sharpness: float
    n: int
    S: torch.Tensor = field(repr=False, compare=False)
    eig_method: str = "exact"

    def as_dict(self) -> dict[str, float]:
        """The scalar fields, e.g. for logging."""
        return {
            "sigma": self.sigma,
            "lambda_S": self.lambda_S,
            "max_sample_sharpness": self.max_sample_sharpness,
            "sharpness": self.sharpness,
            "n": float(self.n),
        }


def _check_symmetric(name: str, mat: torch.Tensor, tol: float) -> None:
    """``mat`` (..., k, k): raise if max |M - M^T| exceeds tol * max |M|."""
    asym = (mat - mat.transpose(-1, -2)).abs().amax()
    scale = mat.abs().amax()
    if asym > tol * max(float(scale), 1e-300):
        raise ValueError(
            f"{name} must be symmetric: max |M - M^T| = {float(asym):.3g} exceeds "
            f"{tol:.1g} x max |M| = {float(scale):.3g}"
        )


def _check_psd_eigs(name: str, eigs: torch.Tensor, tol: float, where: str | None) -> None:
    """Raise naming the most negative eigenvalue if it is below ``-tol * max |eig|``.

    ``eigs`` is (k, m): the spectra of k matrices; ``where`` names one of them ("matrix",
    "diagonal block") in the message, or is ``None`` for a single matrix.
    """
    lo = float(eigs.min())
    scale = float(eigs.abs().max())
    if lo < -tol * max(scale, 1e-300):
        at = ""
        if where is not None:
            at = f" ({where} {int(torch.argmin(eigs.amin(-1)))})"
        raise ValueError(
            f"{name} must be positive semi-definite: most negative eigenvalue {lo:.6g}{at} "
            f"is below the tolerance -{tol * scale:.3g}"
        )


def _finish(
    gram_sq: torch.Tensor,
    sample_sharpness: torch.Tensor,
    sharpness: float,
    eig_method: str,
    tol: float,
) -> CoherenceStats:
    """From G_ij = tr(H_i H_j) and lambda_1(H_i) to the statistics."""
    n = gram_sq.shape[0]
    S = gram_sq.clamp_min(0).sqrt()
    S = 0.5 * (S + S.T)
    max_sample = float(sample_sharpness.max())
    if not max_sample > 0:
        raise UndefinedCoherenceError(
            f"sigma is undefined: all {n} per-sample curvatures are zero "
            "(max_i lambda_1(H_i) = 0, so lambda_1(S) / max_i lambda_1(H_i) is 0/0)"
        )
    eig_method = resolve_eig_method(eig_method, n)
    lam_S = top_eigenvalue(S, eig_method=eig_method, tol=tol, name="S").value
    sigma = lam_S / max_sample
    return CoherenceStats(
        sigma=float(sigma),
        lambda_S=float(lam_S),
        max_sample_sharpness=max_sample,
        sharpness=float(sharpness),
        n=n,
        S=S,
        eig_method=eig_method,
    )


def coherence_from_hessians(
    hessians: torch.Tensor,
    *,
    eig_method: str = "auto",
    tol: float = 1e-10,
    psd_tol: float | None = None,
) -> CoherenceStats:
    """Coherence statistics of dense per-sample Hessians.

    S_ij = sqrt(tr(H_i H_j)) = sqrt(<vec H_i, vec H_j>) for symmetric H_i, computed as one
    (n, d^2) x (d^2, n) product; no matrix square root is formed.

    Accuracy: where tr(H_i H_j) is near 0 (nearly orthogonal curvature), dense float64
    matrices determine it only to about eps ||H_i|| ||H_j||, hence S_ij only to about
    sqrt(eps) ||H|| ~ 1e-8 ||H||: the square root is ill-conditioned at 0, whatever the
    algorithm. Factors (:func:`coherence_from_factors`) do not lose this accuracy.

    Args:
        hessians: (n, d, d) symmetric PSD matrices, any floating dtype.
        eig_method: eigen-solver for lambda_1(S) and lambda_1(H) (see
            :func:`torch_coherence.linalg.top_eigenvalue`).
        tol: relative tolerance of the iterative eigen-solvers.
        psd_tol: relative tolerance of the symmetry and PSD checks (default: 100 machine
            epsilons of the input dtype).

    Raises:
        ValueError: wrong shape, NaN/inf entries, asymmetric or indefinite matrices.
        UndefinedCoherenceError: every H_i is zero.
    """
    check_finite_tensor("hessians", hessians)
    if hessians.dim() != 3 or hessians.shape[1] != hessians.shape[2]:
        raise ValueError(
            f"hessians must have shape (n, d, d) (n square matrices), got {tuple(hessians.shape)}"
        )
    n, d, _ = hessians.shape
    if n < 1 or d < 1:
        raise ValueError(f"hessians must hold n >= 1 matrices of size d >= 1, got n={n}, d={d}")
    tol_in = default_tol(hessians.dtype) if psd_tol is None else psd_tol
    H = hessians.detach().to(torch.float64)
    _check_symmetric("hessians", H, tol_in)
    H = 0.5 * (H + H.transpose(-1, -2))
    eigs = torch.linalg.eigvalsh(H)  # (n, d), ascending
    _check_psd_eigs("hessians", eigs, tol_in, "matrix")
    flat = H.reshape(n, d * d)
    gram_sq = flat @ flat.T
    mean_h = H.mean(0)
    sharpness = top_eigenvalue(mean_h, eig_method=eig_method, tol=tol, name="mean Hessian").value
    return _finish(gram_sq, eigs[:, -1], sharpness, eig_method, tol)


def coherence_from_factors(
    factors: torch.Tensor,
    *,
    eig_method: str = "auto",
    tol: float = 1e-10,
) -> CoherenceStats:
    """Coherence statistics from Gauss-Newton factors, H_i = A_i^T A_i.

    Forms the block Gram K = A A^T (n C x n C) and never a d x d matrix
    (docs/theory.md §3), then calls :func:`coherence_from_gram`.

    Args:
        factors: (n, C, d) tensor of factors A_i (C rows per sample, d parameters).
        eig_method, tol: as in :func:`coherence_from_gram`.
    """
    check_finite_tensor("factors", factors)
    if factors.dim() != 3:
        raise ValueError(
            f"factors must have shape (n, C, d) with H_i = A_i^T A_i, got {tuple(factors.shape)}"
        )
    n, C, d = factors.shape
    if n < 1 or C < 1 or d < 1:
        raise ValueError(f"factors must have n, C, d >= 1, got {tuple(factors.shape)}")
    A = factors.detach().to(torch.float64).reshape(n * C, d)
    K = (A @ A.T).reshape(n, C, n, C)
    return coherence_from_gram(K, eig_method=eig_method, tol=tol, psd_tol=1e-12)


def coherence_from_gram(
    gram: torch.Tensor,
    *,
    eig_method: str = "auto",
    tol: float = 1e-10,
    psd_tol: float | None = None,
) -> CoherenceStats:
    """Coherence statistics from the block Gram matrix K_ij = A_i A_j^T.

    With H_i = A_i^T A_i (docs/theory.md §3):

    * S_ij = ||K_ij||_F (since tr(H_i H_j) = ||A_i A_j^T||_F^2),
    * lambda_1(H_i) = lambda_1(K_ii),
    * lambda_1((1/n) sum_i H_i) = lambda_1(K) / n (A^T A and A A^T share non-zero spectra).

    Args:
        gram: (n, C, n, C) block Gram, or (n, n) when C = 1. Must be symmetric PSD.
        eig_method: eigen-solver for lambda_1(S) and lambda_1(K).
        tol: relative tolerance of the iterative eigen-solvers.
        psd_tol: relative tolerance of the symmetry / PSD checks (default: 100 machine
            epsilons of the input dtype). The PSD check covers every diagonal block K_ii,
            and all of K when ``eig_method`` resolves to the dense solver.

    Raises:
        ValueError: wrong shape, NaN/inf entries, asymmetric or indefinite K.
        UndefinedCoherenceError: K is zero on every diagonal block.
    """
    check_finite_tensor("gram", gram)
    if gram.dim() == 2:
        if gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram of shape (n, n) must be square, got {tuple(gram.shape)}")
        gram = gram.reshape(gram.shape[0], 1, gram.shape[0], 1)
    elif gram.dim() != 4 or gram.shape[0] != gram.shape[2] or gram.shape[1] != gram.shape[3]:
        raise ValueError(f"gram must have shape (n, C, n, C) or (n, n), got {tuple(gram.shape)}")
    n, C = gram.shape[0], gram.shape[1]
    if n < 1 or C < 1:
        raise ValueError(f"gram must have n, C >= 1, got {tuple(gram.shape)}")
    tol_in = default_tol(gram.dtype) if psd_tol is None else psd_tol
    K = gram.detach().to(torch.float64)
    Kflat = K.reshape(n * C, n * C)
    _check_symmetric("gram", Kflat, tol_in)
    Kflat = 0.5 * (Kflat + Kflat.T)
    K = Kflat.reshape(n, C, n, C)
    idx = torch.arange(n)
    diag_blocks = K[idx, :, idx, :]  # (n, C, C)
    block_eigs = torch.linalg.eigvalsh(diag_blocks)
    _check_psd_eigs("gram", block_eigs, tol_in, "diagonal block")
    gram_sq = K.pow(2).sum(dim=(1, 3))  # ||K_ij||_F^2 = tr(H_i H_j)
    resolved = resolve_eig_method(eig_method, n * C)
    if resolved == "exact":
        all_eigs = torch.linalg.eigvalsh(Kflat)
        _check_psd_eigs("gram", all_eigs.unsqueeze(0), tol_in, None)
        top_K = float(all_eigs[-1])
    else:
        top_K = top_eigenvalue(Kflat, eig_method=resolved, tol=tol, name="gram").value
    return _finish(gram_sq, block_eigs[:, -1], top_K / n, eig_method, tol)
