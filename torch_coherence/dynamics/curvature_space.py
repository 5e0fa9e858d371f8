r"""Per-sample curvature reduced to the coefficient space where the dynamics happen.

Every SGD step w <- (I - (eta/B) sum_{i in batch} H_i) w is the identity on the orthogonal
complement of V = range(H_1) + ... + range(H_m) and maps V into itself (docs/theory.md §5). So the
linearized dynamics can be studied on V alone, whose dimension r is at most m C (C rows per
factor), however large the parameter count d is.

With factors A_i (C x d, H_i = A_i^T A_i) and the block Gram K = A A^T = F F^T (F of full
column rank r, from a pivoted Cholesky factorisation), Q = A^T F (F^T F)^(-1) is an
orthonormal basis of V, and the coefficient factors are

    G_i = A_i Q = F_i        (C x r, block i's rows of F),   h_i = G_i^T G_i = Q^T H_i Q,

computed from K alone. Dense Hessians are reduced the same way through the eigenvectors of
sum_i H_i. Diagonal Hessians keep their diagonal (the closed forms of the operator and the
fast path of the simulator use it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._validation import check_finite_tensor, default_tol
from ..linalg import lanczos, symmetric_eigh

__all__ = ["CURVATURE_KINDS", "CoefficientCurvature", "as_coefficient_curvature"]

#: The accepted values of every ``kind`` argument.
CURVATURE_KINDS = ("auto", "hessians", "factors", "gram", "diagonal")

F64 = torch.float64


@dataclass(frozen=True)
class CoefficientCurvature:
    """Per-sample curvature in an orthonormal basis of the joint range V.

    Attributes:
        factors: (m, c, r) float64 coefficient factors G_i, h_i = G_i^T G_i.
        m: number of per-sample curvatures.
        rank: r = dim V.
        diagonal: (m, d) float64 per-sample diagonals when every H_i is diagonal in the
            standard basis (then V-reduction is not needed and closed forms apply), else None.
        kind: the input form that was recognised.
    """

    factors: torch.Tensor = field(repr=False)
    m: int
    rank: int
    diagonal: torch.Tensor | None = field(default=None, repr=False)
    kind: str = "factors"

    def hessians(self) -> torch.Tensor:
        """(m, r, r) coefficient-space Hessians h_i = G_i^T G_i."""
        return self.factors.transpose(1, 2) @ self.factors

    def mean_hessian(self) -> torch.Tensor:
        """(r, r) coefficient-space mean Hessian (1/m) sum_i h_i = (1/m) F^T F.

        F = the (m c, r) stacked factors: one product, never the (m, r, r) Hessians.
        """
        m, c, r = self.factors.shape
        flat = self.factors.reshape(m * c, r)
        return (flat.T @ flat) / m

    def top_eigenvalue(self) -> float:
        """lambda_1 of the mean Hessian (0 for an empty range): dense for r <= 64, else
        Lanczos on v -> F^T (F v) / m (relative accuracy 1e-10 on the value)."""
        m, c, r = self.factors.shape
        if r == 0:
            return 0.0
        if r <= 64:
            return float(torch.linalg.eigvalsh(self.mean_hessian())[-1])
        flat = self.factors.reshape(m * c, r)
        start = flat.square().sum(0).sqrt()  # column norms: weight on the curved directions
        res = lanczos(lambda v: flat.T @ (flat @ v) / m, start, tol=1e-10, max_iter=300,
                      stop="value")  # fmt: skip
        return float(res.value)


def _range_tol(top: float, size: int, rel: float = 1e-13) -> float:
    """Eigenvalues at or below this are round-off: the direction is not in the range."""
    return max(top, 0.0) * max(size * 1e-13, rel)


def _from_gram(K: torch.Tensor, m: int, C: int, kind: str, rel: float) -> CoefficientCurvature:
    """Coefficient factors from the block Gram by pivoted Cholesky (LAPACK ``dpstrf``).

    P^T K P = L L^T with L (m C x r) lower trapezoidal, stopped when every remaining pivot
    (diagonal of the Schur complement) is at most the range tolerance: F = P L satisfies
    F F^T = K up to the dropped Schur complement S, and G_i = F_i (block i's rows) are
    coefficient factors in the orthonormal basis Q = A^T F (F^T F)^(-1) of V
    (Q^T Q = I and A_i Q = F_i when F F^T = K). S (the (m C - r)^2 trailing block, cheap to
    form) is checked: an eigenvalue below -tol means K is not PSD; its norm bounds what
    was dropped. About 10x cheaper than the eigendecomposition of K.
    """
    import numpy as np
    from scipy.linalg import lapack

    Kf = K.reshape(m * C, m * C)
    atol = max(rel, 1e-10) * float(Kf.abs().max()) + 1e-300
    if float((Kf - Kf.T).abs().max()) > atol:
        raise ValueError("gram must be symmetric (K_ij = A_i A_j^T)")
    Kf = 0.5 * (Kf + Kf.T)
    size = m * C
    diag = torch.diagonal(Kf)
    scale = float(diag.max()) if size else 0.0
    if float(diag.min()) < -max(rel, 1e-9) * max(scale, 1e-300):
        raise ValueError(
            f"gram must be positive semidefinite, negative diagonal {float(diag.min())}"
        )
    if scale <= 0.0:
        return CoefficientCurvature(torch.zeros(m, C, 0, dtype=F64), m, 0, None, kind)
    tol = _range_tol(scale, size, rel)
    a = Kf.numpy()
    L, piv, rank, info = lapack.dpstrf(a, tol=tol, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky of the gram failed (LAPACK info {info})")
    piv = piv - 1
    Lk = np.tril(L)[:, :rank]
    rest = piv[rank:]
    if rest.size:
        S = a[np.ix_(rest, rest)] - Lk[rank:] @ Lk[rank:].T
        low = float(np.linalg.eigvalsh(0.5 * (S + S.T))[0])
        if low < -max(rel, 1e-9) * scale * size:
            raise ValueError(f"gram must be positive semidefinite, smallest eigenvalue about {low}")
    F = np.empty((size, rank))
    F[piv] = Lk
    G = torch.from_numpy(F)
    return CoefficientCurvature(G.reshape(m, C, rank), m, int(rank), None, kind)


def _from_hessians(H: torch.Tensor, rel: float) -> CoefficientCurvature:
    m, d, _ = H.shape
    asym = float((H - H.transpose(1, 2)).abs().max()) if H.numel() else 0.0
    scale = float(H.abs().max()) if H.numel() else 0.0
    if asym > max(rel, 1e-10) * max(scale, 1e-300):
        raise ValueError("hessians must be symmetric matrices")
    H = 0.5 * (H + H.transpose(1, 2))
    off = H - torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2))
    if not bool(off.any()):
        diag = torch.diagonal(H, dim1=1, dim2=2).clone()
        if float(diag.min()) < 0:
            raise ValueError("hessians must be positive semidefinite (negative diagonal entry)")
        return _from_diagonal(diag, kind="hessians")
    lam_i, V_i = torch.linalg.eigh(H)
    if float(lam_i.min()) < -max(rel, 1e-9) * max(float(lam_i.max()), 1e-300):
        raise ValueError(
            f"hessians must be positive semidefinite, smallest eigenvalue {float(lam_i.min())}"
        )
    lam, U = symmetric_eigh(H.sum(0))
    keep = lam > _range_tol(float(lam[-1]), d, rel)
    Q = U[:, keep]
    # G_i = diag(sqrt(lam_i)) V_i^T Q, a square root of Q^T H_i Q
    G = lam_i.clamp_min(0).sqrt().unsqueeze(-1) * (V_i.transpose(1, 2) @ Q)
    return CoefficientCurvature(G, m, Q.shape[1], None, "hessians")


def _from_diagonal(D: torch.Tensor, kind: str = "diagonal") -> CoefficientCurvature:
    if float(D.min()) < 0:
        raise ValueError("diagonal curvatures must be >= 0 (PSD Hessians)")
    m = D.shape[0]
    # coefficient factors: one row per coordinate, G_i = diag(sqrt(D_i)) restricted to the
    # coordinates some sample touches
    used = D.max(0).values > 0
    sub = D[:, used]
    G = torch.diag_embed(sub.sqrt())
    return CoefficientCurvature(G, m, int(used.sum()), D, kind)


def as_coefficient_curvature(
    curvature: torch.Tensor | CoefficientCurvature, kind: str = "auto"
) -> CoefficientCurvature:
    """Recognise the curvature form and reduce it to the coefficient space.

    Args:
        curvature: one of

            * (m, d, d) symmetric PSD per-sample Hessians (``kind="hessians"``);
            * (m, C, d) factors A_i with H_i = A_i^T A_i (``kind="factors"``);
            * (m, C, m, C) block Gram K_ij = A_i A_j^T (``kind="gram"``; (m, m) with
              ``kind="gram"`` when C = 1);
            * (m, d) per-sample diagonals (``kind="diagonal"``).

            A :class:`CoefficientCurvature` is passed through.
        kind: which of the above; ``"auto"`` takes 4-D as Gram, 3-D with symmetric square
            slices as Hessians, other 3-D as factors. 2-D input needs an explicit kind.

    Raises:
        ValueError: unknown ``kind``, wrong shape, asymmetric or indefinite input.
        TypeError: not a floating-point tensor.
    """
    if isinstance(curvature, CoefficientCurvature):
        return curvature
    if kind not in CURVATURE_KINDS:
        raise ValueError(f"kind must be one of {CURVATURE_KINDS}, got {kind!r}")
    check_finite_tensor("curvature", curvature)
    rel = default_tol(curvature.dtype)  # round-off level of the input's dtype
    X = curvature.detach().to(F64)
    shape = tuple(X.shape)
    if kind == "auto":
        if X.dim() == 4:
            kind = "gram"
        elif X.dim() == 3:
            square = shape[1] == shape[2]
            kind = "hessians" if square and torch.allclose(X, X.transpose(1, 2)) else "factors"
        else:
            raise ValueError(
                f"curvature of shape {shape} is ambiguous or invalid: pass kind='diagonal' for "
                "(m, d) diagonals or kind='gram' for an (m, m) Gram; otherwise give (m, d, d) "
                "Hessians, (m, C, d) factors or an (m, C, m, C) Gram"
            )
    if X.numel() == 0 or min(shape) < 1:
        raise ValueError(f"curvature must be non-empty, got shape {shape}")
    if kind == "gram":
        if X.dim() == 2 and shape[0] == shape[1]:
            X = X.reshape(shape[0], 1, shape[0], 1)
        if X.dim() != 4 or X.shape[0] != X.shape[2] or X.shape[1] != X.shape[3]:
            raise ValueError(f"curvature (gram) must have shape (m, C, m, C), got {shape}")
        return _from_gram(X, X.shape[0], X.shape[1], "gram", rel)
    if kind == "hessians":
        if X.dim() != 3 or shape[1] != shape[2]:
            raise ValueError(f"curvature (hessians) must have shape (m, d, d), got {shape}")
        return _from_hessians(X, rel)
    if kind == "factors":
        if X.dim() != 3:
            raise ValueError(f"curvature (factors) must have shape (m, C, d), got {shape}")
        m, C, _ = shape
        A = X.reshape(m * C, -1)
        return _from_gram((A @ A.T).reshape(m, C, m, C), m, C, "factors", rel)
    if X.dim() != 2:
        raise ValueError(f"curvature (diagonal) must have shape (m, d), got {shape}")
    return _from_diagonal(X)
