"""The papers' phase-diagram figures: panels, the theorems' boundaries, one run per panel.

Paper 000 Figure 1 ((sigma, B) at eta = 0.8 and 0.5), Figure 2 ((eta, B) at sigma = 5) and
paper 002 C.3 (SGD, SAM and noise-injected SGD at eta = 0.8), all on the Section 5.1
construction with n = 100 (docs/theory.md §7). Every boundary is computed by
:mod:`torch_coherence.theory` for the construction's sharpness lambda_1(H) = 2; the cells
are simulated by :func:`torch_coherence.reproduce.phase_diagram`. No plotting here
(:mod:`torch_coherence.reproduce.plot` draws the figures).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq

from ..theory import critical_lr, gd_threshold, sam_threshold, theorem1_threshold, theorem2_bound
from .section5 import phase_diagram

__all__ = ["FIGURES", "FIGURE1_LRS", "FigureRun", "figure_panels", "run_figure", "theorem_lines"]

#: The reproducible figures.
FIGURES = ("figure1", "figure2", "sam")

#: The learning rates of Figure 1's two panels.
FIGURE1_LRS = (0.8, 0.5)

#: Sharpness lambda_1(H) of the Section 5.1 construction (every sigma, every n).
SHARPNESS = 2.0

#: Data-set size of the papers' Section 5.
N = 100


def figure_panels(figure: str, rho: float = 0.1) -> list[dict[str, object]]:
    """The phase_diagram arguments of each panel of a figure (paper 000 §5, paper 002 C.3)."""
    grid = list(range(1, N + 1))
    if figure == "figure1":
        return [dict(title=f"eta = {e}", lrs=[e], sigmas=grid, batch_sizes=grid, repeats=5)
                for e in FIGURE1_LRS]  # fmt: skip
    if figure == "figure2":
        lrs = [10 ** (-2 + 2 * k / 59) for k in range(60)]
        return [dict(title="sigma = 5", lrs=lrs, sigmas=[5], batch_sizes=grid, repeats=5)]
    if figure == "sam":
        coarse = list(range(2, N + 1, 2))
        base = dict(lrs=[0.8], sigmas=coarse, batch_sizes=coarse, repeats=10)
        return [
            dict(base, title="SGD, eta = 0.8", optimizer="sgd"),
            dict(base, title=f"SAM rho = {rho}, eta = 0.8", optimizer="sam", sam_rho=rho),
            dict(base, title="noise-injected SGD, eta = 0.8", optimizer="noisy_sgd"),
        ]
    raise ValueError(f"figure must be one of {FIGURES}, got {figure!r}")


def _sigma_where(diverges: Callable[[float], bool], hi: float = 1e6) -> float:
    """The coherence sigma in [1, hi] at which ``diverges`` switches from True to False.

    Both theorems' thresholds grow with sigma, so sharpness 2 exceeds them below the
    returned sigma; NaN when it does not at sigma = 1 (the boundary is below the axis)
    and ``hi`` when it still does at ``hi``.
    """
    if not diverges(1.0):
        return math.nan
    if diverges(hi):
        return hi
    return brentq(lambda s: 0.5 - float(diverges(s)), 1.0, hi, xtol=1e-10, rtol=1e-12)


def theorem_lines(
    panel: dict[str, object], batch_sizes: Sequence[float], n: int = N
) -> tuple[np.ndarray, np.ndarray]:
    """(Theorem 1 line, Theorem 2 line) of a panel over batch sizes, from the theory.

    A (B, sigma) panel at fixed eta gets, per B, the sigma below which sharpness 2 exceeds
    the divergence threshold (GD condition and Theorem 1 of paper 000, for SAM the GD
    condition with SAM and Theorem C.8 with lambda_min(H) = 2 / sigma, as the
    ``theorem1_diverges`` column) and the sigma below which it exceeds the Theorem 2 bound.
    A (B, eta) panel at fixed sigma gets :func:`torch_coherence.critical_lr` and the
    learning rate at which the Theorem 2 bound equals 2 (the bound scales as 1 / eta).
    """
    bs = [float(b) for b in batch_sizes]
    lam = SHARPNESS
    if len(panel["sigmas"]) > 1:  # (B, sigma) at one learning rate
        eta = float(panel["lrs"][0])
        rho = panel.get("sam_rho") if panel.get("optimizer") == "sam" else None
        alpha = float(panel.get("sam_alpha", 1.0))

        def t1(b: float) -> Callable[[float], bool]:
            if rho is None:
                return lambda s: lam > min(gd_threshold(eta), theorem1_threshold(s, eta, b, n))
            return lambda s: (
                lam
                > min(
                    gd_threshold(eta, sam_rho=rho, sam_alpha=alpha),
                    sam_threshold(s, eta, b, n, rho, alpha, lam / s),
                )
            )

        def t2(b: float) -> Callable[[float], bool]:
            return lambda s: lam > theorem2_bound(s, eta, b, n)

        return (np.array([_sigma_where(t1(b)) for b in bs]),
                np.array([_sigma_where(t2(b)) for b in bs]))  # fmt: skip
    sigma = float(panel["sigmas"][0])
    line1 = np.array([critical_lr(lam, sigma, b, n) for b in bs])
    line2 = np.array([theorem2_bound(sigma, 1.0, b, n) / lam for b in bs])
    return line1, line2


@dataclass(frozen=True)
class FigureRun:
    """The simulated cells of one figure.

    Attributes:
        figure: one of :data:`FIGURES`.
        panels: the panels (:func:`figure_panels`).
        rows: per (sampling, panel index) the phase-diagram rows, each with its ``panel``
            title added.
        agreement: per (sampling, panel index) :meth:`PhaseDiagram.agreement`.
        seconds: wall time of the simulation.
        n: data-set size.
    """

    figure: str
    panels: list[dict[str, object]] = field(repr=False)
    rows: dict[tuple[str, int], list[dict[str, object]]] = field(repr=False)
    agreement: dict[tuple[str, int], dict[str, float]] = field(repr=False)
    seconds: float
    n: int = N


def run_figure(
    figure: str,
    samplings: Sequence[str] = ("bernoulli", "without_replacement"),
    *,
    rho: float = 0.1,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
) -> FigureRun:
    """Simulate every panel of ``figure`` for each sampling (panel j uses seed ``seed + j``)."""
    panels = figure_panels(figure, rho)
    start = time.perf_counter()
    rows: dict[tuple[str, int], list[dict[str, object]]] = {}
    agreement: dict[tuple[str, int], dict[str, float]] = {}
    for sampling in samplings:
        for j, panel in enumerate(panels):
            kw = {k: v for k, v in panel.items() if k != "title"}
            if steps is not None:
                kw["steps"] = steps
            label = f"{figure} {panel['title']} {sampling}" if progress else None
            pd = phase_diagram(sampling=sampling, seed=seed + j, n=N, progress=label, **kw)
            rows[(sampling, j)] = [dict(r, panel=panel["title"]) for r in pd.rows]
            agreement[(sampling, j)] = pd.agreement()
    return FigureRun(figure, panels, rows, agreement, time.perf_counter() - start)
