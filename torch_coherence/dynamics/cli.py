"""``torch-coherence reproduce figure1 | figure2 | sam | disagree``: the papers' Section 5.

Writes ``<figure>.csv`` (one row per cell, both samplings unless ``--sampling`` picks one),
``<figure>.png`` (red: diverged, blue: converged, grey: undecided; Theorem 1 solid,
Theorem 2 dashed, rho(T) = 1 yellow dotted: mean-square boundary, gamma = 0 white
dash-dotted: typical-run boundary, the top Lyapunov exponent) and
``<figure>_agreement.csv`` (the measured agreement of the theory with the simulation) into
``--out``. ``disagree`` prints the MATH.md §4 example where the two notions disagree
(rho(T) > 1 while gamma < 0) and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

__all__ = ["FIGURES", "add_reproduce", "figure_panels"]

#: The reproducible figures.
FIGURES = ("figure1", "figure2", "sam")

FIGURE1_LRS = (0.8, 0.5)


def figure_panels(figure: str, rho: float = 0.1) -> list[dict[str, object]]:
    """The phase_diagram arguments of each panel of a figure (paper 000 §5, paper 002 C.3)."""
    grid = list(range(1, 101))
    if figure == "figure1":
        return [dict(title=f"eta = {e}", lrs=[e], sigmas=grid, batch_sizes=grid, repeats=5)
                for e in FIGURE1_LRS]  # fmt: skip
    if figure == "figure2":
        lrs = [10 ** (-2 + 2 * k / 59) for k in range(60)]
        return [dict(title="sigma = 5", lrs=lrs, sigmas=[5], batch_sizes=grid, repeats=5)]
    if figure == "sam":
        coarse = list(range(2, 101, 2))
        base = dict(lrs=[0.8], sigmas=coarse, batch_sizes=coarse, repeats=10)
        return [
            dict(base, title="SGD, eta = 0.8", optimizer="sgd"),
            dict(base, title=f"SAM rho = {rho}, eta = 0.8", optimizer="sam", sam_rho=rho),
            dict(base, title="noise-injected SGD, eta = 0.8", optimizer="noisy_sgd"),
        ]
    raise ValueError(f"figure must be one of {FIGURES}, got {figure!r}")


def _lines(ax, panel: dict, xs, n: int, axis: str) -> None:
    """Theorem 1 (solid) and Theorem 2 (dashed) boundaries for lambda_1(H) = 2."""
    import numpy as np

    b = np.asarray(xs, dtype=float)
    r = n / b - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        if axis == "sigma":
            eta = panel["lrs"][0]
            factor = 1.0
            t1 = 2.0 * eta * np.sqrt(r) * factor
            t2 = eta * r / (1.0 - eta)
        else:
            s = panel["sigmas"][0]
            t1 = s / (2.0 * np.sqrt(r))
            t2 = s / (s + r)
    ax.plot(b, t1, "k-", lw=1.5, label="Theorem 1")
    ax.plot(b, t2, "k--", lw=1.5, label="Theorem 2")


def _plot(figure: str, panels: list[dict], results: dict, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    samplings = sorted({k[0] for k in results})
    size = (4.2 * len(panels), 3.8 * len(samplings))
    fig, axes = plt.subplots(len(samplings), len(panels), figsize=size, squeeze=False)
    cmap = ListedColormap(["#3b6fd6", "#bbbbbb", "#d63b3b"])
    code = {"converged": 0, "undecided": 1, "diverged": 2}
    for i, sampling in enumerate(samplings):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            rows = results[(sampling, j)]
            axis = "sigma" if len(panel["sigmas"]) > 1 else "eta"
            ys = panel["sigmas"] if axis == "sigma" else panel["lrs"]
            xs = panel["batch_sizes"]
            key = "sigma" if axis == "sigma" else "eta"
            yi = {v: k for k, v in enumerate(ys)}
            xi = {v: k for k, v in enumerate(xs)}
            lab = np.zeros((len(ys), len(xs)))
            rho = np.zeros((len(ys), len(xs)))
            lyap = np.zeros((len(ys), len(xs)))
            for row in rows:
                a, b = yi[row[key]], xi[row["B"]]
                lab[a, b], rho[a, b] = code[row["label"]], row["rho"]
                # -inf (a factor exactly 0 with positive probability): any negative value
                lyap[a, b] = max(row["lyapunov"], -1.0)
            ax.pcolormesh(xs, ys, lab, cmap=cmap, vmin=0, vmax=2, shading="nearest")
            _lines(ax, panel, np.linspace(min(xs), max(xs), 400), n, axis)
            ax.contour(xs, ys, rho, levels=[1.0], colors="yellow", linestyles=":",
                       linewidths=1.8)  # fmt: skip
            ax.plot([], [], color="yellow", ls=":", label="rho(T) = 1 (mean square)")
            if (lyap > 0).any() and (lyap <= 0).any():
                ax.contour(xs, ys, lyap, levels=[0.0], colors="white", linestyles="-.",
                           linewidths=1.5)  # fmt: skip
            ax.plot([], [], color="white", ls="-.", label="gamma = 0 (typical run)")
            ax.set_ylim(min(ys), max(ys))
            ax.set_xlim(min(xs), max(xs))
            if axis == "eta":
                ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel("coherence sigma" if axis == "sigma" else "learning rate eta")
            ax.set_title(f"{panel['title']} ({sampling})", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right", facecolor="#dddddd")
    fig.suptitle(f"{figure}: red diverged, blue converged, n = {n}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _run_reproduce(args: argparse.Namespace) -> int:
    from .phase import PHASE_COLUMNS, phase_diagram

    if args.figure == "disagree":
        from .lyapunov import disagreement_demo

        print(disagreement_demo())
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samplings = ["bernoulli", "without_replacement"] if args.sampling == "both" else [args.sampling]
    panels = figure_panels(args.figure, args.rho)
    start = time.perf_counter()
    results: dict = {}
    for sampling in samplings:
        for j, panel in enumerate(panels):
            kw = {k: v for k, v in panel.items() if k != "title"}
            if args.steps is not None:
                kw["steps"] = args.steps
            label = f"{args.figure} {panel['title']} {sampling}"
            pd = phase_diagram(sampling=sampling, seed=args.seed + j, n=100, progress=label, **kw)
            results[(sampling, j)] = [dict(r, panel=panel["title"]) for r in pd.rows]
            results[(sampling, j, "agreement")] = pd.agreement()
    elapsed = time.perf_counter() - start
    rows = [r for k, v in results.items() if len(k) == 2 for r in v]
    with (out / f"{args.figure}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["panel", *PHASE_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    agree_rows = []
    for (sampling, j, *rest), v in results.items():
        if rest:
            agree_rows.append({"sampling": sampling, "panel": panels[j]["title"], **v})
    with (out / f"{args.figure}_agreement.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(agree_rows[0]))
        writer.writeheader()
        writer.writerows(agree_rows)
    _plot(args.figure, panels, {k: v for k, v in results.items() if len(k) == 2},
          out / f"{args.figure}.png", 100)  # fmt: skip
    print(f"{args.figure}: {len(rows)} cells simulated in {elapsed:.1f} s; wrote "
          f"{out / (args.figure + '.csv')}, {out / (args.figure + '.png')}")  # fmt: skip
    print(
        "sampling             panel                        T1 cells diverged  "
        "T2 cells converged  rho>1 == diverged  gamma>0 == diverged"
    )
    for a in agree_rows:
        print(f"{a['sampling']:<20} {a['panel']:<28} {_pct(a['theorem1_diverged']):>17}  "
              f"{_pct(a['theorem2_converged']):>18}  {_pct(a['rho_agreement']):>17}  "
              f"{_pct(a['lyapunov_agreement']):>19}")  # fmt: skip
    return 0


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    """Register ``reproduce`` (paper 000 Figures 1-2, paper 002 C.3)."""
    p = sub.add_parser(
        "reproduce",
        help="reproduce the papers' Section 5 phase diagrams (CSV + PNG)",
        description=sys.modules[__name__].__doc__,
    )
    p.add_argument("figure", choices=(*FIGURES, "disagree"))
    p.add_argument("--sampling", choices=("both", "bernoulli", "without_replacement"),
                   default="both")  # fmt: skip
    p.add_argument("--out", default=".", help="output directory (default: current)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rho", type=float, default=0.1, help="SAM radius for 'sam'")
    p.add_argument("--steps", type=int, default=None, help="override the 1000 steps")
    p.set_defaults(func=_run_reproduce)
