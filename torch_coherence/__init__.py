"""torch-coherence: is SGD stable at the current weights, learning rate and batch size?

The public API, grouped by concept:

* coherence (paper 000, Definition 2): :func:`coherence_from_hessians`,
  :func:`coherence_from_factors`, :func:`coherence_from_gram`, :class:`CoherenceStats`.
* estimates over the whole training set (not a probe): :func:`dataset_sharpness`,
  :func:`estimate_sigma`, :func:`exact_sigma`, with :class:`DatasetSharpness` and
  :class:`SigmaEstimate` (each value says the n it refers to); between two of them,
  :func:`tracked_sharpness` (:class:`TrackedSharpness`), the Rayleigh quotient of the last top
  eigenvector on a fresh batch.
* stability theory (paper 000 Theorems 1-2, paper 002 Theorem C.8): :func:`stability_report`,
  :class:`StabilityReport`, :func:`theorem1_threshold`, :func:`theorem2_bound`,
  :func:`gd_threshold`, :func:`sam_threshold`, :func:`critical_lr`,
  :func:`critical_batch_size`.
"""

from .coherence import (
    CoherenceStats,
    UndefinedCoherenceError,
    coherence_from_factors,
    coherence_from_gram,
    coherence_from_hessians,
)

# curvature
from .curvature import (
    CurvatureReport,
    DatasetSharpness,
    SigmaEstimate,
    TrackedSharpness,
    dataset_sharpness,
    estimate_sigma,
    exact_sigma,
    measure_curvature,
    tracked_sharpness,
)
from .curvature.batch_sharpness import batch_sharpness

# dynamics
from .dynamics import (
    LyapunovEstimate,
    PhaseDiagram,
    SimulationResult,
    TypicalCriticalBatchSize,
    TypicalCriticalLR,
    critical_batch_size_exact,
    critical_batch_size_typical,
    critical_lr_exact,
    critical_lr_typical,
    lyapunov_exponent,
    mean_square_rate,
    phase_diagram,
    simulate_linearized_sgd,
)

# empirical lookahead
from .lookahead import LookaheadResult, draw_batches, lookahead

# integrations
from .monitor import CoherenceMonitor
from .probe import (
    BlowupWarning,
    CoherenceProbe,
    CoherenceProbeError,
    CoherenceWarning,
    LinearInstabilityWarning,
    UnstableTrainingError,
)
from .theory import (
    StabilityReport,
    critical_batch_size,
    critical_lr,
    gd_threshold,
    sam_threshold,
    stability_report,
    theorem1_threshold,
    theorem2_bound,
)

__version__ = "0.1.0"

__all__ = [
    # curvature
    "CurvatureReport",
    "batch_sharpness",
    "measure_curvature",
    # estimates over the whole training set
    "DatasetSharpness",
    "SigmaEstimate",
    "TrackedSharpness",
    "dataset_sharpness",
    "estimate_sigma",
    "exact_sigma",
    "tracked_sharpness",
    # coherence
    "CoherenceStats",
    "UndefinedCoherenceError",
    "coherence_from_factors",
    "coherence_from_gram",
    "coherence_from_hessians",
    # stability theory
    "StabilityReport",
    "critical_batch_size",
    "critical_lr",
    "gd_threshold",
    "sam_threshold",
    "stability_report",
    "theorem1_threshold",
    "theorem2_bound",
    # dynamics
    "critical_batch_size_exact",
    "critical_batch_size_typical",
    "critical_lr_exact",
    "critical_lr_typical",
    "lyapunov_exponent",
    "LyapunovEstimate",
    "TypicalCriticalBatchSize",
    "TypicalCriticalLR",
    "mean_square_rate",
    "PhaseDiagram",
    "SimulationResult",
    "phase_diagram",
    "simulate_linearized_sgd",
    # empirical lookahead
    "LookaheadResult",
    "draw_batches",
    "lookahead",
    # integrations
    "BlowupWarning",
    "CoherenceMonitor",
    "CoherenceProbe",
    "CoherenceProbeError",
    "CoherenceWarning",
    "LinearInstabilityWarning",
    "UnstableTrainingError",
]
