r"""The paper's Section 5 experiments: phase diagrams of linearized SGD (paper 000, Figures 1-2).

Construction (paper 000 §5.1; docs/theory.md §2, §7): n samples, coherence sigma = s,

    H_i = m e_1 e_1^T (i <= s),   H_i = m e_{i-s+1} e_{i-s+1}^T (i > s),   m = 2n / s,

so lambda_1(H) = 2 and the dimension is n - s + 1. The update is Definition 1,
w <- (I - (eta/B) sum_{i in batch} H_i) w (not the factor 2 H_i of the paper's printed loss).
Each cell (eta, sigma, B) is run ``repeats`` times for up to ``steps`` steps with the
1000x growth / shrink rule of :mod:`torch_coherence.dynamics.simulate`; all cells are
simulated together through the sparse diagonal fast path. Each cell also gets the Theorem 1
verdict (sharpness 2 above the GD or Theorem 1 threshold), the Theorem 2 verdict (2 below
the bound, where paper 000 proves that this construction converges in mean square for
Bernoulli sampling), the exact rho(T) of :func:`mean_square_rate` (mean-square stability)
and the exact top Lyapunov exponent gamma of :func:`section51_lyapunov` (typical-run
stability: the §5.1 Jacobians are diagonal, so gamma = max over coordinates of E log|j|
without sampling; the same formula :func:`lyapunov_exponent` uses for commuting curvature).

Paper 002 C.3 repeats the experiment for SAM and noise-injected SGD (``optimizer``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._validation import check_positive, check_sample_count
from ..dynamics.curvature_space import as_coefficient_curvature
from ..dynamics.lyapunov import _group_log_moment
from ..dynamics.operator import check_sampling, mean_square_rate
from ..dynamics.simulate import (
    check_optimizer,
    check_run_options,
    majority_label,
    run_trajectories,
)
from ..theory import gd_threshold, sam_threshold, theorem1_threshold, theorem2_bound

__all__ = [
    "PHASE_COLUMNS",
    "PhaseDiagram",
    "phase_diagram",
    "section51_diagonals",
    "section51_lyapunov",
]

#: Columns of :meth:`PhaseDiagram.write_csv`, one row per cell.
PHASE_COLUMNS = (
    "sampling", "optimizer", "eta", "sigma", "B", "repeats", "diverged_fraction",
    "converged_fraction", "label", "theorem1_diverges", "theorem2_bound_holds", "rho",
    "lyapunov",
)  # fmt: skip

F64 = torch.float64

#: dtype of the simulated trajectories (the 1000x rule needs no more).
DT = torch.float32


def _section51_apply(n: int, sigmas: list[int], q: float):
    """H_hat P u for the §5.1 construction without forming any matrix.

    Both samplings are exchangeable in the sample labels, so the s coherent samples can be
    taken to be the *last* s: coordinate 0 gets m X with X the number of them in the batch,
    coordinate a = 1 .. n - s gets m x_{a-1} (sample a - 1); the batch indicators come
    already divided by B. SAM: P = diag(1 + q H) with H = diag(2, 2/s, ..., 2/s).
    """
    sig = torch.tensor(sigmas, dtype=DT)
    mval = 2.0 * n / sig
    p0 = 1.0 + q * 2.0
    prest = 1.0 + q * 2.0 / sig
    k_rest = torch.tensor([n - s for s in sigmas])
    cols = torch.arange(n - 1)

    def apply(ind: torch.Tensor, u: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        cs = ind.cumsum(1)
        k = k_rest[cell]
        before = torch.where(k > 0, cs.gather(1, (k - 1).clamp_min(0).unsqueeze(1))[:, 0], 0.0)
        coherent = cs[:, -1] - before
        mv = mval[cell]
        out = torch.empty_like(u)
        out[:, 0] = mv * p0 * coherent * u[:, 0]
        valid = cols.unsqueeze(0) < k.unsqueeze(1)
        out[:, 1:] = (mv * prest[cell]).unsqueeze(1) * ind[:, : n - 1] * u[:, 1:] * valid
        return out

    return apply


def section51_lyapunov(
    n: int, sigma: int, lr: float, batch_size: float, sampling: str, sam_q: float = 0.0
) -> float:
    """Exact top Lyapunov exponent of the paper's §5.1 construction (commuting, docs/theory.md §7).

    Coordinate 1: j = 1 - (eta m / B)(1 + 2 q) X with X ~ Binomial(sigma, B/n) (Bernoulli)
    or Hypergeometric(n, sigma, B) (without replacement), m = 2 n / sigma; every other
    coordinate: j = 1 - (eta m / B)(1 + 2 q / sigma) with probability B/n, else 1, so
    E log|j| = (B/n) log|1 - (eta m / B)(1 + 2 q / sigma)|. gamma is the larger of the two
    (only the first when sigma = n); -inf when a factor can be exactly 0.
    """
    m = 2.0 * n / sigma
    c = lr * m / batch_size
    one = np.ones(1)
    first = _group_log_moment(one, np.array([sigma]), n, batch_size, sampling,
                              c * (1.0 + 2.0 * sam_q))  # fmt: skip
    if sigma == n:
        return float(first)
    other = _group_log_moment(one, np.array([1]), n, batch_size, sampling,
                              c * (1.0 + 2.0 * sam_q / sigma))  # fmt: skip
    return max(float(first), float(other))


def section51_diagonals(n: int, sigma: int) -> torch.Tensor:
    """(n, n - sigma + 1) per-sample diagonals of the §5.1 construction (coherence sigma).

    Pass them with ``kind="diagonal"``; ``torch.diag_embed`` gives the Hessians.
    """
    n = check_sample_count("n", n)
    s = check_sample_count("sigma", sigma)
    if s > n:
        raise ValueError(f"sigma must lie in [1, n] = [1, {n}] for this construction, got {s}")
    D = torch.zeros(n, n - s + 1, dtype=F64)
    cols = torch.cat([torch.zeros(s, dtype=torch.long), torch.arange(1, n - s + 1)])
    D[torch.arange(n), cols] = 2.0 * n / s
    return D


@dataclass(frozen=True)
class PhaseDiagram:
    """One phase diagram: a row per (eta, sigma, B) cell, in :data:`PHASE_COLUMNS` order.

    Attributes:
        rows: tuple of dicts keyed by :data:`PHASE_COLUMNS`.
        n, steps, seed: the protocol.
    """

    rows: tuple[dict[str, object], ...] = field(repr=False)
    n: int
    steps: int
    seed: int

    def write_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV with a header; returns the path."""
        path = Path(path)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PHASE_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def agreement(self) -> dict[str, float]:
        """Measured agreement of the theory with the simulated labels.

        Returns ``theorem1_cells``, ``theorem1_diverged`` (fraction of Theorem-1 cells whose
        label is diverged), ``theorem2_cells``, ``theorem2_converged`` (fraction of cells
        below the Theorem 2 bound whose label is converged), ``cells`` and
        ``rho_agreement`` (fraction of cells where rho(T) > 1 iff the label is diverged) and
        ``lyapunov_agreement`` (the same for the top Lyapunov exponent > 0). NaN where a
        set is empty.
        """
        t1 = [r for r in self.rows if r["theorem1_diverges"]]
        t2 = [r for r in self.rows if r["theorem2_bound_holds"]]

        def frac(rows: list, label: str) -> float:
            return sum(r["label"] == label for r in rows) / len(rows) if rows else math.nan

        agree = sum((r["rho"] > 1) == (r["label"] == "diverged") for r in self.rows)
        lyap = sum((r["lyapunov"] > 0) == (r["label"] == "diverged") for r in self.rows)
        return {
            "cells": len(self.rows),
            "theorem1_cells": len(t1),
            "theorem1_diverged": frac(t1, "diverged"),
            "theorem2_cells": len(t2),
            "theorem2_converged": frac(t2, "converged"),
            "rho_agreement": agree / len(self.rows) if self.rows else math.nan,
            "lyapunov_agreement": lyap / len(self.rows) if self.rows else math.nan,
        }


def phase_diagram(
    lrs: Sequence[float],
    sigmas: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    n: int = 100,
    sampling: str = "bernoulli",
    steps: int = 1000,
    repeats: int = 5,
    grow: float = 1e3,
    shrink: float = 1e3,
    seed: int = 0,
    optimizer: str = "sgd",
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    noise_std: float = 1e-6,
    progress: str | None = None,
) -> PhaseDiagram:
    """Simulate every (eta, sigma, B) cell of the §5.1 construction (paper 000 Section 5).

    Args:
        lrs: learning rates eta > 0.
        sigmas: coherence values, integers in [1, n].
        batch_sizes: integers in [1, n].
        n: data-set size (paper: 100).
        sampling: ``"bernoulli"`` or ``"without_replacement"``.
        steps, repeats, grow, shrink: the outcome rule (paper: 1000, 5, 1000, 1000).
        seed: seed of the generator (fixed for reproducibility).
        optimizer: ``"sgd"``, ``"sam"`` or ``"noisy_sgd"`` (paper 002 C.3).
        sam_rho, sam_alpha: SAM radius and normaliser.
        noise_std: perturbation of ``"noisy_sgd"``.
        progress: a label to print a progress bar on stderr with (None: silent).

    Returns:
        A :class:`PhaseDiagram`. ``theorem1_diverges`` is lambda_1 = 2 above
        min(GD threshold, Theorem 1 threshold) (for SAM: the GD threshold with SAM and
        Theorem C.8 with lambda_min(H) = 2 / sigma); ``theorem2_bound_holds`` is
        2 < theorem2_bound; ``rho`` is rho(T) of the cell's optimizer (noise injection does
        not change T).
    """
    n = check_sample_count("n", n)
    sampling = check_sampling(sampling)
    steps, repeats, grow, shrink = check_run_options(steps, repeats, grow, shrink)
    q = check_optimizer(optimizer, sam_rho, sam_alpha)
    lrs = [check_positive("lrs", x) for x in lrs]
    sigmas = [check_sample_count("sigmas", s) for s in sigmas]
    batch_sizes = [check_sample_count("batch_sizes", b) for b in batch_sizes]
    for name, vals in (("sigmas", sigmas), ("batch_sizes", batch_sizes)):
        if any(v > n for v in vals):
            raise ValueError(f"{name} must lie in [1, n] = [1, {n}]")
    if not (lrs and sigmas and batch_sizes):
        raise ValueError("lrs, sigmas and batch_sizes must be non-empty")
    sam = {"sam_rho": sam_rho, "sam_alpha": sam_alpha} if optimizer == "sam" else {}

    grid = [(e, k, b) for e in lrs for k in range(len(sigmas)) for b in batch_sizes]
    cell_of = torch.arange(len(grid)).repeat_interleave(repeats)
    sig_idx = torch.tensor([g[1] for g in grid], dtype=torch.long)[cell_of]
    lr_t = torch.tensor([g[0] for g in grid], dtype=DT)[cell_of]
    bs_t = torch.tensor([g[2] for g in grid], dtype=DT)[cell_of]
    gen = torch.Generator().manual_seed(int(seed))
    w0 = torch.randn(len(cell_of), n, generator=gen, dtype=DT)
    # coordinates 1 .. n - sigma exist (coordinate 0 is the coherent one)
    width = torch.tensor([n - s + 1 for s in sigmas])[sig_idx]
    w0 = w0 * (torch.arange(n).unsqueeze(0) < width.unsqueeze(1))
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    noise = noise_std if optimizer == "noisy_sgd" else 0.0
    apply = _section51_apply(n, sigmas, q)
    codes, _, _ = run_trajectories(
        apply, w0, sig_idx, lr_t, bs_t, n, steps=steps, grow=grow, shrink=shrink,
        sampling=sampling, momentum=0.0, noise_std=noise, gen=gen, record=False,
        progress=progress,
    )  # fmt: skip
    codes = codes.view(len(grid), repeats)
    div = (codes == 1).to(F64).mean(1)
    conv = (codes == -1).to(F64).mean(1)

    coeff = {s: as_coefficient_curvature(section51_diagonals(n, s), "diagonal") for s in sigmas}
    rows = []
    for c, (eta, k, b) in enumerate(grid):
        s = sigmas[k]
        if optimizer == "sam":
            t1 = min(gd_threshold(eta, sam_rho=sam_rho, sam_alpha=sam_alpha),
                     sam_threshold(s, eta, b, n, sam_rho, sam_alpha, 2.0 / s))  # fmt: skip
        else:
            t1 = min(gd_threshold(eta), theorem1_threshold(s, eta, b, n))
        rho = mean_square_rate(coeff[s], eta, b, n, sampling=sampling, **sam)
        d, v = float(div[c]), float(conv[c])
        rows.append({
            "sampling": sampling, "optimizer": optimizer, "eta": eta, "sigma": s, "B": b,
            "repeats": repeats, "diverged_fraction": d, "converged_fraction": v,
            "label": majority_label(d, v), "theorem1_diverges": 2.0 > t1,
            "theorem2_bound_holds": 2.0 < theorem2_bound(s, eta, b, n), "rho": rho,
            "lyapunov": section51_lyapunov(n, s, eta, b, sampling, q),
        })  # fmt: skip
    return PhaseDiagram(tuple(rows), n, steps, int(seed))
