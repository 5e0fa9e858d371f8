"""Independent references and problem cases shared by the tests.

The references here use NumPy only (explicit eigendecomposition-based matrix square roots),
so they share no code with the implementation under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64


@dataclass(frozen=True)
class Reference:
    """Brute-force coherence statistics of a set of dense Hessians."""

    sigma: float
    lambda_S: float
    max_sample_sharpness: float
    sharpness: float
    S: np.ndarray


def psd_sqrt(h: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root through an explicit eigendecomposition."""
    w, v = np.linalg.eigh(0.5 * (h + h.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def reference_coherence(hessians: np.ndarray) -> Reference:
    """Definition 2 of paper 000 verbatim: S_ij = ||H_i^{1/2} H_j^{1/2}||_F."""
    roots = [psd_sqrt(h) for h in hessians]
    n = len(roots)
    S = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            S[i, j] = np.linalg.norm(roots[i] @ roots[j], "fro")
    lam_S = np.linalg.eigvalsh(S)[-1]
    max_sample = max(np.linalg.eigvalsh(h)[-1] for h in hessians)
    sharp = np.linalg.eigvalsh(hessians.mean(0))[-1]
    return Reference(lam_S / max_sample, lam_S, max_sample, sharp, S)


def section51_hessians(n: int, s: int) -> torch.Tensor:
    """Paper 000 §5.1: H_i = m e_1 e_1^T (i <= s), m e_{i-s+1} e_{i-s+1}^T otherwise.

    m = 2n/s and dimension n - s + 1, so that sigma = s and lambda_1(H) = 2.
    """
    d = n - s + 1
    m = 2.0 * n / s
    H = torch.zeros(n, d, d, dtype=F64)
    for i in range(n):
        k = 0 if i < s else i - s + 1
        H[i, k, k] = m
    return H


def random_factors(gen: torch.Generator, n: int, C: int, d: int) -> torch.Tensor:
    """Gaussian factors A_i (n, C, d) with varied per-sample scales."""
    scales = torch.rand(n, 1, 1, generator=gen, dtype=F64) + 0.2
    return scales * torch.randn(n, C, d, generator=gen, dtype=F64)


def hessians_from_factors(factors: torch.Tensor) -> torch.Tensor:
    """H_i = A_i^T A_i."""
    return torch.einsum("ncd,nce->nde", factors, factors)


def random_hessians(seed: int, n: int = 5, C: int = 2, d: int = 3) -> torch.Tensor:
    """n random PSD d x d per-sample Hessians of rank C (seeded), float64."""
    gen = torch.Generator().manual_seed(seed)
    return hessians_from_factors(random_factors(gen, n, C, d))


def top_eig(hessians) -> float:
    """lambda_1 of the mean of ``hessians``."""
    return float(np.linalg.eigvalsh(np.asarray(hessians).mean(0))[-1])
