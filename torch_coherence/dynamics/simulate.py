r"""Monte-Carlo runs of linearized SGD, SAM and noise-injected SGD (paper 000 Definition 1).

One step, with H_hat = (1/B) sum_{i in batch} H_i, H = mean_i H_i and heavy-ball beta:

* ``"sgd"``:       w <- w - eta H_hat w + beta (w - w_prev)
* ``"sam"``:       w <- w - eta H_hat (I + (rho/alpha) H) w + ...   (paper 002, Theorem C.8)
* ``"noisy_sgd"``: w <- w - eta H_hat (w + delta_t) + ..., delta_t ~ N(0, noise_std^2 I)
  (paper 002, the random-perturbation update of Theorem C.7, equation (14)).

The outcome rule is the paper's (Section 5; paper 002 C.3): a run *diverged* when
||w_k|| >= grow ||w_0||, *converged* (stopped early) when ||w_k|| <= ||w_0|| / shrink, and
is *undecided* when neither happened within ``steps``. The runs are vectorised over repeats
(and, for :func:`torch_coherence.dynamics.phase_diagram`, over many (eta, B, curvature)
cells at once); finished runs are dropped from the batch. Diagonal curvature uses a sparse
fast path (cost per step proportional to the non-zeros of the diagonals), other curvature
runs in the coefficient space of :mod:`torch_coherence.dynamics.curvature_space`.

These are the typical (sample-path) outcomes; they are not the mean-square notion of
:func:`torch_coherence.dynamics.mean_square_rate`: E||w_k||^2 can diverge while most runs
shrink (docs/theory.md §7).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from .._validation import check_momentum, check_nonnegative, check_positive, check_sample_count
from .curvature_space import CoefficientCurvature, as_coefficient_curvature
from .operator import check_sampling

__all__ = ["OPTIMIZERS", "OUTCOMES", "SimulationResult", "simulate_linearized_sgd"]

#: Accepted values of every ``optimizer`` argument.
OPTIMIZERS = ("sgd", "sam", "noisy_sgd")

#: Per-run outcomes, in the order of their integer codes 1, -1, 0.
OUTCOMES = ("diverged", "converged", "undecided")

F64 = torch.float64


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of :func:`simulate_linearized_sgd`.

    Attributes:
        outcomes: per repeat, ``"diverged"``, ``"converged"`` or ``"undecided"``.
        steps_taken: per repeat, the step at which the run was decided (``steps`` if not).
        norms: (repeats, steps + 1) float64 ratios ||w_k|| / ||w_0||; NaN after the run was
            decided.
        diverged_fraction: fraction of repeats that diverged.
        converged_fraction: fraction of repeats that converged.
        label: ``"diverged"`` if more than half diverged, ``"converged"`` if more than half
            converged, else ``"undecided"`` (the paper's majority rule).
    """

    outcomes: tuple[str, ...]
    steps_taken: tuple[int, ...]
    norms: torch.Tensor = field(repr=False)
    diverged_fraction: float
    converged_fraction: float
    label: str


def majority_label(diverged_fraction: float, converged_fraction: float) -> str:
    """The paper's rule: diverged if more than half of the repetitions diverged."""
    if diverged_fraction > 0.5:
        return "diverged"
    if converged_fraction > 0.5:
        return "converged"
    return "undecided"


def check_run_options(steps: object, repeats: object, grow: object, shrink: object):
    """Validate the outcome-rule options; returns (steps, repeats, grow, shrink)."""
    steps = check_sample_count("steps", steps)
    repeats = check_sample_count("repeats", repeats)
    grow = check_positive("grow", grow)
    shrink = check_positive("shrink", shrink)
    if grow <= 1:
        raise ValueError(f"grow must be > 1 (a growth factor of ||w||), got {grow}")
    if shrink <= 1:
        raise ValueError(f"shrink must be > 1 (a shrink factor of ||w||), got {shrink}")
    return steps, repeats, grow, shrink


def check_optimizer(optimizer: object, sam_rho: object | None, sam_alpha: object) -> float:
    """Validate the optimizer name and return SAM's q = rho / alpha (0 unless SAM)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    alpha = check_positive("sam_alpha", sam_alpha)
    if optimizer != "sam":
        return 0.0
    if sam_rho is None:
        raise ValueError("optimizer='sam' needs sam_rho (the SAM radius rho)")
    return check_nonnegative("sam_rho", sam_rho) / alpha


@dataclass(frozen=True)
class DiagonalCells:
    """Diagonal curvature of several cells (e.g. one per coherence value of a phase diagram).

    Attributes:
        diagonals: (cells, m, d) per-sample diagonals; a trajectory of cell c applies
            H_hat = diag((1/B) sum_{i in batch} diagonals[c, i]).
        mean: (cells, d) mean diagonal H of each cell.
    """

    diagonals: torch.Tensor = field(repr=False)
    mean: torch.Tensor = field(repr=False)

    @classmethod
    def from_dense(cls, diagonals: torch.Tensor) -> DiagonalCells:
        """From (cells, m, d) dense diagonals."""
        return cls(diagonals, diagonals.mean(1))


def _sample_batches(T, m, bs, n_int, sampling, gen, dtype):
    """(T, m) 0/1 batch indicators, one batch per trajectory with batch sizes ``bs``."""
    if sampling == "bernoulli":
        u = torch.rand(T, m, generator=gen, dtype=dtype)
        return (u < (bs / m).to(dtype).unsqueeze(1)).to(dtype)
    # selection sampling (Knuth, Algorithm S): item i is taken with probability
    # (still needed) / (items left); every B-subset is equally likely
    u = torch.rand(m, T, generator=gen, dtype=dtype)
    need = n_int.to(dtype)
    out = torch.empty(m, T, dtype=dtype)
    for i in range(m):
        out[i] = u[i] * (m - i) < need
        need = need - out[i]
    return out.T


def run_trajectories(
    apply_hessian,
    w0: torch.Tensor,
    cell: torch.Tensor,
    lr: torch.Tensor,
    bs: torch.Tensor,
    m: int,
    *,
    steps: int,
    grow: float,
    shrink: float,
    sampling: str,
    momentum: float,
    noise_std: float,
    gen: torch.Generator,
    record: bool,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run T trajectories; returns (codes 1/-1/0, steps taken, norms or None).

    ``apply_hessian(ind, u, cell)`` returns (1/B) sum_i ind_i H_i P u per trajectory (the
    batch-size division included by the caller through ``ind``).
    """
    order = torch.argsort(cell, stable=True)
    w0, cell, lr, bs = w0[order], cell[order], lr[order], bs[order]
    T, _ = w0.shape
    dtype = w0.dtype
    codes = torch.zeros(T, dtype=torch.int8)
    taken = torch.full((T,), steps, dtype=torch.long)
    norms = torch.full((T, steps + 1), math.nan, dtype=F64) if record else None
    n0 = w0.norm(dim=1)
    if norms is not None:
        norms[:, 0] = 1.0
    active = torch.arange(T)
    w, w_prev = w0.clone(), w0.clone()
    lr_a, bs_a, cell_a, n0_a = lr.clone(), bs.clone(), cell.clone(), n0.clone()
    b_int = bs_a.round().long()
    hi, lo = grow, 1.0 / shrink
    for k in range(1, steps + 1):
        ind = _sample_batches(active.numel(), m, bs_a, b_int, sampling, gen, dtype)
        ind = ind / bs_a.unsqueeze(1)
        u = w
        if noise_std > 0:
            u = w + noise_std * torch.randn(w.shape, generator=gen, dtype=dtype)
        step = apply_hessian(ind, u, cell_a)
        w_new = w - lr_a.unsqueeze(1) * step
        if momentum:
            w_new = w_new + momentum * (w - w_prev)
        w_prev, w = w, w_new
        ratio = w.norm(dim=1) / n0_a
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, math.inf))
        if norms is not None:
            norms[active, k] = ratio.to(F64)
        up, down = ratio >= hi, ratio <= lo
        done = up | down
        if bool(done.any()):
            idx = active[done]
            codes[idx] = torch.where(up[done], 1, -1).to(torch.int8)
            taken[idx] = k
            keep = ~done
            active, w, w_prev = active[keep], w[keep], w_prev[keep]
            lr_a, bs_a, cell_a, n0_a, b_int = (
                lr_a[keep], bs_a[keep], cell_a[keep], n0_a[keep], b_int[keep]
            )  # fmt: skip
        if progress is not None and (k % 20 == 0 or k == steps or active.numel() == 0):
            frac = k / steps
            bar = "#" * int(30 * frac)
            sys.stderr.write(
                f"\r{progress} [{bar:<30}] step {k}/{steps}, {active.numel()} runs active "
            )
            sys.stderr.flush()
        if active.numel() == 0:
            break
    if progress is not None:
        sys.stderr.write("\n")
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T)
    return codes[inverse], taken[inverse], None if norms is None else norms[inverse]


def diagonal_apply(cells: DiagonalCells, q: float):
    """apply_hessian for diagonal cells: (ind @ D_cell) * P_cell * u, one matmul per cell.

    Trajectories must be sorted by cell (:func:`run_trajectories` does so), so that every
    cell is a contiguous slice of the batch.
    """
    P = 1.0 + q * cells.mean

    def apply(ind: torch.Tensor, u: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(u)
        ids, counts = torch.unique_consecutive(cell, return_counts=True)
        start = 0
        for c, k in zip(ids.tolist(), counts.tolist(), strict=True):
            sl = slice(start, start + k)
            out[sl] = (ind[sl] @ cells.diagonals[c]) * P[c] * u[sl]
            start += k
        return out

    return apply


def _factor_apply(G: torch.Tensor, q: float):
    """apply_hessian in the coefficient space: sum_i ind_i G_i^T G_i P u."""
    H = (G.transpose(1, 2) @ G).mean(0)
    P = torch.eye(H.shape[0], dtype=G.dtype) + q * H

    def apply(ind: torch.Tensor, u: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        v = u @ P.T
        y = torch.einsum("mcr,tr->tmc", G, v) * ind.unsqueeze(2)
        return torch.einsum("mcr,tmc->tr", G, y)

    return apply


def simulate_linearized_sgd(
    curvature: torch.Tensor | CoefficientCurvature,
    lr: float,
    batch_size: float,
    *,
    steps: int = 1000,
    repeats: int = 5,
    sampling: str = "bernoulli",
    grow: float = 1e3,
    shrink: float = 1e3,
    seed: int | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    sam_rho: float | None = None,
    sam_alpha: float = 1.0,
    noise_std: float = 1e-6,
    kind: str = "auto",
) -> SimulationResult:
    """Run linearized SGD / SAM / noise-injected SGD from random unit starts.

    The data set is the m given curvatures (n = m); each step samples a batch by Bernoulli
    sampling (each i with probability B/m) or B out of m without replacement, and applies the
    update of the module docstring. w_0 is a standard Gaussian vector (normalised) in the
    joint range of the H_i; the rest of the parameter space never moves.

    Args:
        curvature: (m, d, d) Hessians, (m, C, d) factors, (m, C, m, C) Gram, (m, d)
            diagonals with ``kind="diagonal"`` (sparse fast path), or a
            :class:`CoefficientCurvature`.
        lr: learning rate eta > 0.
        batch_size: B in [1, m] (an integer for ``"without_replacement"``).
        steps: maximum number of steps (>= 1).
        repeats: independent runs (>= 1), vectorised.
        sampling: ``"bernoulli"`` or ``"without_replacement"``.
        grow: a run diverged once ||w_k|| >= grow ||w_0|| (> 1; paper: 1000).
        shrink: a run converged once ||w_k|| <= ||w_0|| / shrink (> 1; paper: 1000).
        seed: seed of the private generator (None: nondeterministic).
        optimizer: ``"sgd"``, ``"sam"`` (needs ``sam_rho``) or ``"noisy_sgd"``.
        momentum: heavy-ball beta in [0, 1).
        sam_rho, sam_alpha: SAM radius and normaliser (Jacobian I - eta H_hat (I + rho/alpha H)).
        noise_std: standard deviation of the perturbation delta_t of ``"noisy_sgd"``.
        kind: curvature form, see :func:`as_coefficient_curvature`.

    Returns:
        A :class:`SimulationResult`.
    """
    steps, repeats, grow, shrink = check_run_options(steps, repeats, grow, shrink)
    sampling = check_sampling(sampling)
    q = check_optimizer(optimizer, sam_rho, sam_alpha)
    beta = check_momentum(momentum)
    noise = check_nonnegative("noise_std", noise_std) if optimizer == "noisy_sgd" else 0.0
    lr = check_positive("lr", lr)
    cc = as_coefficient_curvature(curvature, kind)
    b = check_positive("batch_size", batch_size)
    if not 1 <= b <= cc.m:
        raise ValueError(f"batch_size must lie in [1, m] = [1, {cc.m}], got {b}")
    if sampling == "without_replacement" and not float(b).is_integer():
        raise ValueError(f"batch_size must be an integer for without_replacement, got {b}")
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    if cc.diagonal is not None:
        used = cc.diagonal.max(0).values > 0
        cells = DiagonalCells.from_dense(cc.diagonal[:, used].unsqueeze(0))
        apply = diagonal_apply(cells, q)
        r = int(used.sum())
    else:
        apply = _factor_apply(cc.factors, q)
        r = cc.rank
    if r == 0:
        norms = torch.ones(repeats, steps + 1, dtype=F64)
        return SimulationResult(("undecided",) * repeats, (steps,) * repeats, norms, 0.0, 0.0,
                                "undecided")  # fmt: skip
    w0 = torch.randn(repeats, r, generator=gen, dtype=F64)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    codes, taken, norms = run_trajectories(
        apply, w0, torch.zeros(repeats, dtype=torch.long),
        torch.full((repeats,), lr, dtype=F64), torch.full((repeats,), b, dtype=F64), cc.m,
        steps=steps, grow=grow, shrink=shrink, sampling=sampling, momentum=beta,
        noise_std=noise, gen=gen, record=True,
    )  # fmt: skip
    names = {1: "diverged", -1: "converged", 0: "undecided"}
    outcomes = tuple(names[int(c)] for c in codes)
    div = outcomes.count("diverged") / repeats
    conv = outcomes.count("converged") / repeats
    return SimulationResult(
        outcomes, tuple(int(t) for t in taken), norms, div, conv, majority_label(div, conv)
    )
