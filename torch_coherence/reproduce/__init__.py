"""Reproductions of the papers' experiments (docs/theory.md §7), built on the maths packages.

* :mod:`~torch_coherence.reproduce.section5`: the Section 5.1 construction (coherence
  sigma, lambda_1(H) = 2) and :func:`phase_diagram`, its simulation cell by cell with the
  theorems' verdicts, rho(T) and the exact top Lyapunov exponent.
* :mod:`~torch_coherence.reproduce.figures`: the panels of paper 000 Figures 1-2 and paper
  002 C.3, their boundaries from :mod:`torch_coherence.theory`, :func:`run_figure`.
* :mod:`~torch_coherence.reproduce.plot`: drawing them (the only module here that imports
  matplotlib; imported on use).
* :mod:`~torch_coherence.reproduce.disagree`: the example where rho(T) > 1 but gamma < 0.

The command line (``torch-coherence reproduce ...``) is :mod:`torch_coherence.cli.reproduce`.
"""

from .disagree import disagreement_demo
from .figures import FIGURES, FigureRun, figure_panels, run_figure, theorem_lines
from .section5 import (
    PHASE_COLUMNS,
    PhaseDiagram,
    phase_diagram,
    section51_diagonals,
    section51_lyapunov,
)

__all__ = [
    "FIGURES",
    "PHASE_COLUMNS",
    "FigureRun",
    "PhaseDiagram",
    "disagreement_demo",
    "figure_panels",
    "phase_diagram",
    "run_figure",
    "section51_diagonals",
    "section51_lyapunov",
    "theorem_lines",
]
