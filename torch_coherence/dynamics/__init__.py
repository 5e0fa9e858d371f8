"""Exact mean-square stability and simulation of linearized SGD (docs/theory.md §5, §7).

* :func:`mean_square_rate`: rho(T), the spectral radius of the second-moment operator.
* :func:`critical_lr_exact`, :func:`critical_batch_size_exact`: where rho(T) = 1.
* :func:`simulate_linearized_sgd`: Monte-Carlo runs of Definition 1 (paper 000).
* :func:`lyapunov_exponent`: the top Lyapunov exponent gamma (typical-run stability).
* :func:`critical_lr_typical`, :func:`critical_batch_size_typical`: where gamma = 0.

The paper's Section 5 experiments (:func:`phase_diagram`, :func:`section51_diagonals`,
:func:`section51_lyapunov`) and :func:`disagreement_demo` live in
:mod:`torch_coherence.reproduce` and are re-exported here under their former names.
"""

from ..reproduce.disagree import disagreement_demo
from .curvature_space import CoefficientCurvature, as_coefficient_curvature
from .lyapunov import (
    LyapunovEstimate,
    LyapunovPrecisionWarning,
    TypicalCriticalBatchSize,
    TypicalCriticalLR,
    critical_batch_size_typical,
    critical_lr_typical,
    lyapunov_exponent,
    stability_verdict,
)
from .operator import (
    NonMonotoneRateWarning,
    critical_batch_size_exact,
    critical_lr_exact,
    mean_square_rate,
    sampling_coefficients,
)
from .phase import PhaseDiagram, phase_diagram, section51_diagonals, section51_lyapunov
from .simulate import SimulationResult, simulate_linearized_sgd

__all__ = [
    "CoefficientCurvature",
    "LyapunovEstimate",
    "LyapunovPrecisionWarning",
    "NonMonotoneRateWarning",
    "PhaseDiagram",
    "SimulationResult",
    "TypicalCriticalBatchSize",
    "TypicalCriticalLR",
    "as_coefficient_curvature",
    "critical_batch_size_exact",
    "critical_batch_size_typical",
    "critical_lr_exact",
    "critical_lr_typical",
    "disagreement_demo",
    "lyapunov_exponent",
    "mean_square_rate",
    "phase_diagram",
    "sampling_coefficients",
    "section51_diagonals",
    "section51_lyapunov",
    "simulate_linearized_sgd",
    "stability_verdict",
]
