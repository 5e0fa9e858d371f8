r"""Batch sharpness: curvature of each mini-batch loss along its own gradient.

Andreyev & Beneventano (2024), "Edge of Stochastic Stability: Revisiting the Edge of
Stability for SGD" (arXiv:2412.20553): for mini-batch SGD the quantity that settles at
:math:`2/\eta` during training (as the full-batch sharpness does for gradient descent) is

.. math::

    \mathrm{BS} = \mathbb E_B\!\left[\frac{g_B^\top H_B\, g_B}{\lVert g_B\rVert^2}\right],
    \qquad g_B = \nabla L_B(w),\ H_B = \nabla^2 L_B(w),

the directional curvature of each mini-batch loss :math:`L_B` along its own gradient (the
direction SGD actually steps in), averaged over mini-batches. It is a Rayleigh quotient of
:math:`H_B`, so it never exceeds :math:`\lambda_1(H_B)`; with one batch equal to the whole
training set it is the curvature of the full loss along the full gradient. Compare it with
``2 / lr`` (``2 (1 + beta) / lr`` with heavy-ball momentum beta).

Each batch costs one forward, one backward with ``create_graph=True`` and one Hessian-vector
product :math:`H_B g_B = \nabla_w (g_B \cdot \mathrm{sg}(g_B))` (Pearlmutter 1994). Batches
whose gradient is exactly zero have no direction and are skipped.

The model is evaluated in ``eval()`` mode (BatchNorm running statistics, dropout off), as
every curvature measure of this package, and its state and the RNGs are restored exactly
(:func:`torch_coherence._state.preserved_state`).

Not implemented: the *interaction-aware sharpness* of Lee & Jang (ICLR 2023, "A new
characterization of the edge of stability based on a sharpness measure aware of batch
gradient distribution"): its exact definition could not be checked against the paper's text
here, and a formula written from memory would be a silent wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._state import preserved_state

__all__ = ["batch_sharpness"]


def _ratio(
    model: nn.Module,
    loss: Callable,
    batch: tuple[Any, Any],
    params: list[torch.Tensor],
    forward_fn: Callable | None,
) -> float | None:
    """g^T H g / g^T g on one batch (None when the gradient is zero)."""
    x, y = batch
    out = model(x) if forward_fn is None else forward_fn(model, x)
    value = loss(out, y)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("loss must return a scalar tensor (use a mean or sum reduction)")
    if not bool(torch.isfinite(value.detach())):
        raise ValueError(f"the mini-batch loss is not finite ({float(value.detach()):g})")
    grads = torch.autograd.grad(value.reshape(()), params, create_graph=True, allow_unused=True)
    pairs = [(g, p) for g, p in zip(grads, params, strict=True) if g is not None]
    norm2 = sum(float(g.detach().double().square().sum()) for g, _ in pairs)
    if norm2 == 0.0:
        return None
    live = [(g, p) for g, p in pairs if g.requires_grad]  # constant gradients: zero curvature
    if not live:
        return 0.0
    hg = torch.autograd.grad(
        [g for g, _ in live],
        [p for _, p in live],
        grad_outputs=[g.detach() for g, _ in live],
        allow_unused=True,
    )
    num = sum(
        float((g.detach().double() * h.double()).sum())
        for (g, _), h in zip(live, hg, strict=True)
        if h is not None
    )
    return num / norm2


def batch_sharpness(
    model: nn.Module,
    loss: Callable[[Any, Any], torch.Tensor],
    batches: Sequence[tuple[Any, Any]],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> float:
    r"""Mean over ``batches`` of :math:`g_B^\top H_B g_B / \lVert g_B\rVert^2` (see module).

    Args:
        model: the network (evaluated in eval mode; restored exactly afterwards).
        loss: ``loss(outputs, targets) -> scalar tensor``, the mini-batch training loss
            (mean reduction, as the optimizer sees it).
        batches: ``(inputs, targets)`` mini-batches of the training batch size, e.g. from
            :func:`torch_coherence.lookahead.draw_batches`.
        forward_fn: ``forward_fn(model, inputs) -> outputs`` instead of ``model(inputs)``.

    Returns:
        The batch sharpness (same units as the Hessian's eigenvalues; compare with
        ``2 / lr``).

    Raises:
        TypeError / ValueError: bad arguments, a non-scalar or non-finite loss, no
            trainable parameters, or a zero gradient on every batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise TypeError(f"loss must be callable (outputs, targets) -> tensor, got {loss!r}")
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError("batches must be a non-empty list of (inputs, targets) pairs")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True")
    values: list[float] = []
    with preserved_state(model), torch.enable_grad():
        for i, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"batches[{i}] must be an (inputs, targets) pair")
            r = _ratio(model, loss, batch, params, forward_fn)
            if r is not None:
                values.append(r)
    if not values:
        raise ValueError("batch_sharpness: the gradient is zero on every batch (undefined)")
    out = sum(values) / len(values)
    if not math.isfinite(out):
        raise ValueError(f"batch_sharpness is not finite ({out}): NaN or inf curvature")
    return out
