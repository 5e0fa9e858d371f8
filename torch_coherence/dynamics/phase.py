"""Former home of the Section 5 phase diagrams: re-exports
:mod:`torch_coherence.reproduce.section5`.
"""

from ..reproduce.section5 import (
    PHASE_COLUMNS,
    PhaseDiagram,
    phase_diagram,
    section51_diagonals,
    section51_lyapunov,
)

__all__ = [
    "PHASE_COLUMNS",
    "PhaseDiagram",
    "phase_diagram",
    "section51_diagonals",
    "section51_lyapunov",
]
