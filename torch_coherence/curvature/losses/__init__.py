r"""Output-space curvature of the training loss: per-sample losses, Lambda_i and its square root.

For a per-sample loss :math:`l(f_i, y_i)` the Gauss-Newton factor of sample i is
:math:`A_i = B_i^\top J_i` with :math:`B_i B_i^\top = \Lambda_i = \partial^2 l / \partial f^2`
(docs/theory.md §3). The per-sample loss is chosen so that the *mean* over samples is the
training loss with ``reduction="mean"``; then :math:`\frac1m \sum_i H_i` is the GGN of the
training loss.

One class per loss (:class:`.base.LossCurvature`): :mod:`.classification` (cross-entropy and
NLL on (m, C), MSE, BCE with logits), :mod:`.sequence` (cross-entropy / NLL on (m, T, V) or
(m, V, T): a sample is a sequence; top-k factors for large vocabularies), :mod:`.custom`
(a per-sample callable). :mod:`.factor` holds the square roots that are built column by
column. The functions below are the engine's entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import LossCurvature, OutputCurvature
from .classification import BCECurvature, MSECurvature, SoftmaxCurvature
from .custom import CallableCurvature
from .factor import LazyFactor, append_columns, column, is_finite, sample_block

__all__ = [
    "SUPPORTED",
    "LossCurvature",
    "LossLike",
    "OutputCurvature",
    "LazyFactor",
    "append_columns",
    "check_loss",
    "column",
    "curvature_of",
    "is_finite",
    "output_curvature",
    "output_gradients",
    "per_sample_losses",
    "sample_block",
    "sampled_curvature",
    "truncated_curvature",
]

SUPPORTED = (
    "nn.CrossEntropyLoss, nn.NLLLoss (on (m, C), or sequences (m, T, V) / (m, V, T)), "
    "nn.MSELoss, nn.BCEWithLogitsLoss (reduction 'mean' or 'sum'), or a per-sample callable "
    "loss(output_i, target_i) -> scalar tensor (wrap it in a plain function, e.g. "
    "`lambda o, t: my_loss(o[None], t[None])`)"
)

LossLike = nn.Module | Callable[..., torch.Tensor]

_CLASSES: tuple[tuple[type, type[LossCurvature]], ...] = (
    (nn.CrossEntropyLoss, SoftmaxCurvature),
    (nn.NLLLoss, SoftmaxCurvature),
    (nn.MSELoss, MSECurvature),
    (nn.BCEWithLogitsLoss, BCECurvature),
)


def curvature_of(loss: Any) -> LossCurvature:
    """The :class:`LossCurvature` of ``loss`` (``TypeError`` when unsupported)."""
    for kind, cls in _CLASSES:
        if isinstance(loss, kind):
            return cls(loss)
    if isinstance(loss, nn.Module) or not callable(loss):
        raise TypeError(f"loss: unsupported loss {type(loss).__name__}; supported: {SUPPORTED}")
    return CallableCurvature(loss)


def check_loss(loss: Any) -> None:
    """Raise ``TypeError``/``ValueError`` when ``loss`` is not supported."""
    curvature_of(loss).check()


def per_sample_losses(loss: Any, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-sample losses l_i whose mean is the training loss (mean reduction)."""
    return curvature_of(loss).per_sample(outputs, targets)


def output_curvature(loss: Any, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
    """Exact square roots B_i (m, C, R) of Lambda_i at ``outputs`` (detached, float64)."""
    return curvature_of(loss).exact(outputs, targets)


def output_gradients(loss: Any, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-sample dl_i/df_i, shape (m, C), float64 (for the per-sample gradient Gram)."""
    return curvature_of(loss).gradients(outputs, targets)


def sampled_curvature(
    loss: Any, outputs: torch.Tensor, targets: Any, samples: int, generator: torch.Generator
) -> OutputCurvature:
    r"""Monte-Carlo square roots (m, C, samples) with :math:`E[B B^\top] = \Lambda_i`.

    Cross-entropy / NLL: sampled labels (Fisher sampling; for sequences one column per draw,
    summed over tokens). Other losses: :math:`B_i Z / \sqrt S` with Rademacher Z.
    """
    return curvature_of(loss).sampled(outputs, targets, samples, generator)


def truncated_curvature(
    loss: Any, outputs: torch.Tensor, targets: Any, tol: float
) -> OutputCurvature:
    r"""Top-k square roots for cross-entropy / NLL with relative error at most ``tol`` per
    token (``OutputCurvature.truncation`` is the bound reached; :mod:`.sequence`); the exact
    factor for the other losses."""
    return curvature_of(loss).truncated(outputs, targets, tol)
