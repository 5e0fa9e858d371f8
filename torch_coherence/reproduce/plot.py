"""Drawing the phase-diagram figures (matplotlib; imported only when a figure is drawn).

Red: diverged, blue: converged, grey: undecided (the majority rule of paper 000 §5);
solid: Theorem 1 (with the GD condition; Theorem C.8 on a SAM panel), dashed: Theorem 2,
both from :func:`torch_coherence.reproduce.theorem_lines`; yellow dotted: rho(T) = 1 (the
mean-square boundary); white dash-dotted: gamma = 0 (the typical-run boundary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .figures import FigureRun, theorem_lines

__all__ = ["plot_figure"]

_CODE = {"converged": 0, "undecided": 1, "diverged": 2}


def _grids(rows: list[dict], ys: list, xs: list, key: str) -> tuple[np.ndarray, ...]:
    yi = {v: k for k, v in enumerate(ys)}
    xi = {v: k for k, v in enumerate(xs)}
    lab = np.zeros((len(ys), len(xs)))
    rho = np.zeros((len(ys), len(xs)))
    lyap = np.zeros((len(ys), len(xs)))
    for row in rows:
        a, b = yi[row[key]], xi[row["B"]]
        lab[a, b], rho[a, b] = _CODE[row["label"]], row["rho"]
        # -inf (a factor exactly 0 with positive probability): any negative value
        lyap[a, b] = max(row["lyapunov"], -1.0)
    return lab, rho, lyap


def _panel(ax, panel: dict, rows: list[dict], n: int, title: str, legend: bool) -> None:
    axis = "sigma" if len(panel["sigmas"]) > 1 else "eta"
    ys = panel["sigmas"] if axis == "sigma" else panel["lrs"]
    xs = panel["batch_sizes"]
    lab, rho, lyap = _grids(rows, ys, xs, axis)
    cmap = ListedColormap(["#3b6fd6", "#bbbbbb", "#d63b3b"])
    ax.pcolormesh(xs, ys, lab, cmap=cmap, vmin=0, vmax=2, shading="nearest")
    fine = np.linspace(min(xs), max(xs), 400)
    line1, line2 = theorem_lines(panel, fine, n)
    ax.plot(fine, line1, "k-", lw=1.5, label="Theorem 1")
    ax.plot(fine, line2, "k--", lw=1.5, label="Theorem 2")
    ax.contour(xs, ys, rho, levels=[1.0], colors="yellow", linestyles=":", linewidths=1.8)
    ax.plot([], [], color="yellow", ls=":", label="rho(T) = 1 (mean square)")
    if (lyap > 0).any() and (lyap <= 0).any():
        ax.contour(xs, ys, lyap, levels=[0.0], colors="white", linestyles="-.", linewidths=1.5)
    ax.plot([], [], color="white", ls="-.", label="gamma = 0 (typical run)")
    ax.set_ylim(min(ys), max(ys))
    ax.set_xlim(min(xs), max(xs))
    if axis == "eta":
        ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("coherence sigma" if axis == "sigma" else "learning rate eta")
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, loc="lower right", facecolor="#dddddd")


def plot_figure(run: FigureRun, path: str | Path) -> Path:
    """Draw every (sampling, panel) of ``run`` (rows: samplings, columns: panels) as a PNG."""
    samplings = sorted({s for s, _ in run.rows})
    panels = run.panels
    fig = Figure(figsize=(4.2 * len(panels), 3.8 * len(samplings)))
    for i, sampling in enumerate(samplings):
        for j, panel in enumerate(panels):
            ax = fig.add_subplot(len(samplings), len(panels), i * len(panels) + j + 1)
            title = f"{panel['title']} ({sampling})"
            _panel(ax, panel, run.rows[(sampling, j)], run.n, title, i == 0 and j == 0)
    fig.suptitle(f"{run.figure}: red diverged, blue converged, n = {run.n}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=70)
    return path
