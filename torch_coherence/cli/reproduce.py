"""``torch-coherence reproduce figure1 | figure2 | sam | disagree``: the papers' Section 5.

Writes ``<figure>.csv`` (one row per cell, both samplings unless ``--sampling`` picks one),
``<figure>.png`` (red: diverged, blue: converged, grey: undecided; Theorem 1 solid,
Theorem 2 dashed, rho(T) = 1 yellow dotted: mean-square boundary, gamma = 0 white
dash-dotted: typical-run boundary, the top Lyapunov exponent) and
``<figure>_agreement.csv`` (the measured agreement of the theory with the simulation) into
``--out``. ``disagree`` prints the docs/theory.md §4 example where the two notions disagree
(rho(T) > 1 while gamma < 0) and writes nothing. The computations are
:mod:`torch_coherence.reproduce`; this module only parses, writes and prints.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from ..reproduce import FIGURES, PHASE_COLUMNS, FigureRun, disagreement_demo, run_figure

__all__ = ["add_reproduce"]


def _write_csvs(run: FigureRun, out: Path) -> list[dict[str, object]]:
    rows = [r for v in run.rows.values() for r in v]
    with (out / f"{run.figure}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["panel", *PHASE_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    agree_rows = [{"sampling": s, "panel": run.panels[j]["title"], **v}
                  for (s, j), v in run.agreement.items()]  # fmt: skip
    with (out / f"{run.figure}_agreement.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(agree_rows[0]))
        writer.writeheader()
        writer.writerows(agree_rows)
    return agree_rows


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _run_reproduce(args: argparse.Namespace) -> int:
    if args.figure == "disagree":
        print(disagreement_demo())
        return 0
    from ..reproduce.plot import plot_figure

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samplings = ["bernoulli", "without_replacement"] if args.sampling == "both" else [args.sampling]
    run = run_figure(args.figure, samplings, rho=args.rho, seed=args.seed, steps=args.steps)
    agree_rows = _write_csvs(run, out)
    plot_figure(run, out / f"{args.figure}.png")
    cells = sum(len(v) for v in run.rows.values())
    print(f"{args.figure}: {cells} cells simulated in {run.seconds:.1f} s; wrote "
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
