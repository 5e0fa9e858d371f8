"""The coherence probe shared by :class:`~torch_coherence.CoherenceMonitor` and the Lightning
callback, as a package whose parts a reader finds by name:

* :mod:`.probe`: :class:`CoherenceProbe` (measure -> assess -> decide -> commit, state);
* :mod:`.assess`: the pure assessment and its functional twin :func:`assess`;
* :mod:`.schedule`: steps, time budget, pre-flight and triggered probes;
* :mod:`.light`: the light probe (tracked sharpness) between full probes, and its escalation;
* :mod:`.policy`: criterion, hysteresis, actions;
* :mod:`.messages`: every user-facing sentence and the warning categories;
* :mod:`.tags`: the one list of metric tags (:data:`TAGS`, :data:`TAG_DESCRIPTIONS`).

Two verdicts, two categories: :class:`BlowupWarning` when the lookahead predicts that
training blows up; :class:`LinearInstabilityWarning` when the linearized dynamics at these
weights are unstable (expect a loss spike or a move to flatter weights, not necessarily
divergence).
"""

from __future__ import annotations

from typing import Any

from .assess import (
    LYAPUNOV_SAMPLES,
    LYAPUNOV_SETTINGS,
    TYPICAL_LR_REL_TOL,
    Assessment,
    Estimate,
    assess,
    effective_optimizer_params,
    linear_dynamics,
    probe_estimates,
    sam_alpha,
)
from .data import sample_probe
from .messages import (
    BlowupWarning,
    CoherenceProbeError,
    CoherenceWarning,
    LinearInstabilityWarning,
    UnstableTrainingError,
)
from .policy import (
    ACT_ON,
    CRITERIA,
    ON_UNSTABLE,
    Decision,
    Policy,
    PolicyState,
    set_learning_rate,
)
from .probe import (
    EXTRA_OPTIONS,
    LOOKAHEAD_STEPS,
    LYAPUNOV_FIRST_SECONDS,
    SHARED_OPTIONS,
    CoherenceProbe,
    ProbeResult,
    shared_options,
)
from .schedule import LR_FACTOR, SPIKE_FACTOR, Schedule
from .tags import CONDITIONAL_TAGS, TAG_DESCRIPTIONS, TAGS

__all__ = [
    "ACT_ON",
    "CONDITIONAL_TAGS",
    "CRITERIA",
    "EXTRA_OPTIONS",
    "LOOKAHEAD_STEPS",
    "LR_FACTOR",
    "LYAPUNOV_FIRST_SECONDS",
    "LYAPUNOV_SAMPLES",
    "LYAPUNOV_SETTINGS",
    "ON_UNSTABLE",
    "SHARED_OPTIONS",
    "SPIKE_FACTOR",
    "TAGS",
    "TAG_DESCRIPTIONS",
    "TYPICAL_LR_REL_TOL",
    "Assessment",
    "BlowupWarning",
    "CoherenceProbe",
    "CoherenceProbeError",
    "CoherenceWarning",
    "Decision",
    "Estimate",
    "LinearInstabilityWarning",
    "Policy",
    "PolicyState",
    "ProbeResult",
    "Schedule",
    "UnstableTrainingError",
    "as_sequence",
    "assess",
    "effective_optimizer_params",
    "linear_dynamics",
    "probe_estimates",
    "sam_alpha",
    "sample_probe",
    "set_learning_rate",
    "shared_options",
]


def as_sequence(x: Any) -> list[Any]:
    """``x`` as a list (helper for loggers given as one or many)."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
