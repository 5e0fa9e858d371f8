r"""The light probe: the tracked sharpness between full probes, and when it asks for one.

A full probe (the engine's Gram on the probe batch, the data-set estimates, the lookahead)
costs tens to hundreds of training steps on small models (``docs/warnings_messages.md``), so
the ``max_overhead`` budget allows few or none of them in a short fit. When a scheduled full
probe does not fit the budget, the probe runs a light one instead, at about one or two
training steps: :func:`~torch_coherence.curvature.tracked_sharpness`, the Rayleigh quotient

.. math::

    r = \frac1m \sum_{i \in \text{batch}} (J_i v)^\top \Lambda_i (J_i v)

of the last full probe's top eigenvector v (of the training loss's GGN, or of a Hessian)
on a fresh batch of m examples drawn from the training set with the probe's own generator
(seeded by the seed and the step; never the global RNG). For v independent of the batch it
is an unbiased estimate of :math:`v^\top G_n v \le \lambda_1(G_n)`, logged with its
standard error (``sharpness/tracked``, ``sharpness/tracked_stderr``).

**Escalation** (:func:`escalation`): the light probe asks for a full probe at once (a
triggered probe, counted against ``max_triggered``) when

* :math:`\eta\,(r + \text{wd})` reaches :data:`GD_FRACTION` of the gradient-descent bound
  :math:`2(1 + \beta)` (:math:`\beta` the momentum; ``docs/theory.md §4``) while the last
  full probe's sharpness was below it at the current learning rate (a full probe that saw it
  there has judged it already: at the edge of stability the sharpness hovers at the bound,
  and re-asking at every light probe would spend ``max_triggered`` on it), or
* r exceeds :data:`RISE_FACTOR` times the sharpness of the last full probe while
  :math:`\eta\,(r + \text{wd})` is at least :data:`RISE_FLOOR` of the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import data as _data

__all__ = [
    "GD_FRACTION",
    "RISE_FACTOR",
    "RISE_FLOOR",
    "Tracked",
    "draw_batch",
    "escalation",
    "metrics",
]

#: A light probe asks for a full probe when lr (r + wd) reaches this fraction of 2 (1 + beta).
GD_FRACTION = 0.8
#: ... or when r exceeds this many times the last full probe's sharpness.
RISE_FACTOR = 1.5
#: ... the rise counting only once lr (r + wd) is at least this fraction of 2 (1 + beta): a
#: sharpness that grows from far below the bound (early training) asks for nothing, so that
#: ``max_triggered`` is kept for the guard (a digits MLP from initialisation, lr 0.1: 0.52
#: at step 0, 3.14 at step 100, lr x sharpness 0.05-0.3 against a bound of 2).
RISE_FLOOR = 0.25
#: How every escalation reason begins (the triggered probe that answers it is told apart).
ESCALATION_PREFIX = "tracked sharpness"
#: Assumed cost of a light probe before it has run once, in training steps.
FIRST_COST_STEPS = 2.0


@dataclass(frozen=True)
class Tracked:
    """What the last full probe leaves for the light ones.

    Attributes:
        vector: its top eigenvector (flat float64, the model's trainable parameters in order).
        kind: ``"ggn"`` or ``"hessian"``: the matrix ``vector`` belongs to.
        sharpness: the full probe's sharpness (the value the thresholds used).
        step: the optimizer step of that probe.
        params: the parameters ``vector`` belongs to, in its order (empty: the model's
            trainable ones); a light probe runs only while they are still exactly the
            trainable parameters it measures.
    """

    vector: torch.Tensor
    kind: str
    sharpness: float
    step: int
    params: tuple[torch.Tensor, ...] = ()


def draw_batch(dataset: Any, size: int, seed: int, step: int, device: torch.device) -> tuple:
    """``size`` examples (all if fewer) of ``dataset`` without replacement, drawn by a private
    generator seeded by ``seed`` and ``step`` (the same on every rank and rerun)."""
    from .._state import preserved_rng
    from ..curvature.sharpness import data_batch

    n = len(dataset)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + 53)
    idx = torch.randperm(n, generator=gen)[: min(size, n)].sort().values
    tensors = getattr(dataset, "tensors", None)  # a TensorDataset: index, do not collate
    if isinstance(dataset, _data.Pairs):
        x, y = _data.index(dataset.inputs, idx), _data.index(dataset.targets, idx)
    elif isinstance(tensors, tuple) and len(tensors) == 2:
        x, y = tensors[0][idx], tensors[1][idx]
    else:  # items may draw a random augmentation: the global generators are put back
        with preserved_rng():
            x, y = data_batch(dataset, idx, torch.device("cpu"))
    return _data.to(x, device), _data.to(y, device)


def escalation(value: float, settings: dict[str, float | None], tracked: Tracked) -> str | None:
    """Why the light probe's tracked sharpness asks for a full probe now, or ``None``."""
    lr = float(settings.get("lr") or 0.0)
    momentum = min(float(settings.get("momentum") or 0.0), 0.999999)
    lam = value + float(settings.get("weight_decay") or 0.0)
    bound = 2.0 * (1.0 + momentum)
    seen = lr * (tracked.sharpness + float(settings.get("weight_decay") or 0.0))
    if lr > 0 and lr * lam >= GD_FRACTION * bound > seen:
        return (
            f"tracked sharpness {value:.4g}: lr x sharpness = {lr * lam:.3g} reached "
            f"{GD_FRACTION:g} of the gradient-descent bound 2 (1 + momentum) = {bound:.3g}"
        )
    rising = tracked.sharpness > 0 and value > RISE_FACTOR * tracked.sharpness
    if rising and lr * lam >= RISE_FLOOR * bound:
        return (
            f"tracked sharpness {value:.4g} above {RISE_FACTOR:g} x the last full probe's "
            f"{tracked.sharpness:.4g} (step {tracked.step})"
        )
    return None


def metrics(result: Any) -> dict[str, float]:
    """The light probe's tags from a :class:`~torch_coherence.curvature.TrackedSharpness`."""
    out = {"sharpness/tracked": float(result.value), "probe/size": float(result.m)}
    if math.isfinite(result.stderr):
        out["sharpness/tracked_stderr"] = float(result.stderr)
    return out
