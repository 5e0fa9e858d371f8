r"""Tracked sharpness: the Rayleigh quotient of a known top eigenvector on a fresh batch.

Between two full sharpness computations (Lanczos over the training set,
:func:`~torch_coherence.curvature.dataset_sharpness`) the sharpness can be *tracked* at the
cost of about one or two training steps: keep the last top eigenvector v of the training
loss's GGN :math:`G_n = \frac1n \sum_{i=1}^n J_i^\top \Lambda_i J_i` (or of its Hessian
:math:`H_n = \frac1n \sum_i \nabla^2 l_i`), draw a fresh batch of m examples, and compute

.. math::

    r = \frac{1}{m} \sum_{i \in \text{batch}} q_i, \qquad
    q_i = \frac{(J_i v)^\top \Lambda_i (J_i v)}{v^\top v}
    \quad\text{(GGN)}, \qquad
    q_i = \frac{v^\top \nabla^2 l_i\, v}{v^\top v} \quad\text{(Hessian)},

with :math:`J_i` the Jacobian of sample i's (flattened) output with respect to the
parameters and :math:`\Lambda_i = B_i B_i^\top` the Hessian of its loss with respect to the
output (:mod:`torch_coherence.curvature.losses`; ``docs/theory.md §3``).

**Unbiased.** When the batch is drawn uniformly (with or without replacement) and
independently of v, every :math:`q_i` has expectation :math:`v^\top G_n v / v^\top v`, so
:math:`E[r] = v^\top G_n v / v^\top v \le \lambda_1(G_n)` (Rayleigh), with equality when v is
still the top eigenvector. Its standard error is that of a mean of m draws,

.. math::

    \mathrm{se}(r) = \frac{s_q}{\sqrt m}\,\sqrt{1 - \frac{m}{n}}

(:math:`s_q` the sample standard deviation of the :math:`q_i`; the finite-population factor
for a draw without replacement from n examples, 1 when n is not given). r underestimates the
current sharpness when the top eigenvector has rotated since v was computed: it is a lower
bound in expectation, never an overestimate of :math:`\lambda_1`.

**Cost.** GGN: one forward-mode pass gives the outputs and all :math:`J_i v` at once
(``torch.autograd.forward_ad`` dual numbers through :func:`torch.func.functional_call`), then
:math:`\|B_i^\top J_i v\|^2` per sample in output space. Measured (1 thread, m = 64, load
7): 2.4 ms on the digits MLP 64-64-10 and 35 ms on the digits CNN 16-32, against 2.6 and 29
ms for a forward and backward pass of the same batch. A model with an operation that has no
forward-mode rule falls back to the double-vjp trick (:math:`Jv = \partial_u
\big[(J^\top u) \cdot v\big]`, the vjp of the vjp :math:`u \mapsto J^\top u`: one
forward and two backward passes, 6.3 and 58 ms there).
Hessian: :math:`v^\top \nabla^2 l_i v` per sample by the same trick applied twice to the
vector of per-sample losses (:math:`d_i = \nabla l_i \cdot v`, then :math:`\nabla d_i
\cdot v`), about twice the GGN's cost.

The model runs in eval mode inside :func:`torch_coherence._state.preserved_state`:
parameters, buffers, ``.grad``, modes and RNG states are restored exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TrackedSharpness", "tracked_sharpness", "warm_up"]

KINDS = ("ggn", "hessian")


@dataclass(frozen=True)
class TrackedSharpness:
    """The Rayleigh quotient of ``vector`` on one batch (:func:`tracked_sharpness`).

    Attributes:
        value: r, the mean of the per-sample quotients.
        stderr: its standard error over batch draws (``s_q / sqrt(m)``, times the
            finite-population factor ``sqrt(1 - m/n)`` when ``n`` was given; nan for m = 1).
        m: the batch size.
        n: the population the batch was drawn from (``None``: not given).
        kind: ``"ggn"`` or ``"hessian"``.
        per_sample: the per-sample quotients q_i, float64 (m,).
        seconds: wall time.
    """

    value: float
    stderr: float
    m: int
    n: int | None
    kind: str
    per_sample: torch.Tensor
    seconds: float


def _jvp(
    outputs: torch.Tensor, params: list[torch.Tensor], vs: list[torch.Tensor], create_graph: bool
) -> torch.Tensor | None:
    r""":math:`J v` of ``outputs`` (any shape) along ``vs`` by the double-vjp trick."""
    u = torch.zeros_like(outputs, requires_grad=True)
    gu = torch.autograd.grad(outputs, params, grad_outputs=u, create_graph=True, allow_unused=True)
    pairs = [(g, v) for g, v in zip(gu, vs, strict=True) if g is not None and g.requires_grad]
    if not pairs:
        return None
    (jv,) = torch.autograd.grad(
        [g for g, _ in pairs],
        u,
        grad_outputs=[v for _, v in pairs],
        create_graph=create_graph,
        allow_unused=True,
    )
    return jv


def warm_up() -> None:
    """Pay the one-time cost of the first forward-mode pass now: torch loads its jvp
    decompositions on first use (``torch._decomp``; 1-2 s on one loaded CPU thread, 0.5 ms for
    the passes after it). The probe calls it at its full probes, so that no light probe's
    measured cost includes it."""
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        fwad.make_dual(torch.zeros(1), torch.zeros(1))


def _forward_jvp(
    fwd: nn.Module, inputs: object, params: list[torch.Tensor], vs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and :math:`J v` of one forward-mode pass (raises where a rule is missing)."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call

    names = {id(p): k for k, p in fwd.named_parameters(remove_duplicate=False)}
    if any(id(p) not in names for p in params):
        raise ValueError("a parameter is not one of the model's")
    with torch.no_grad(), fwad.dual_level():
        duals = {
            names[id(p)]: fwad.make_dual(p.detach(), v) for p, v in zip(params, vs, strict=True)
        }
        out = fwad.unpack_dual(functional_call(fwd, duals, (inputs,)))
    if out.tangent is None:  # no parameter reaches the outputs
        return out.primal, torch.zeros_like(out.primal)
    return out.primal, out.tangent


def _ggn_quotients(
    loss: object,
    fwd: nn.Module,
    x: object,
    y: object,
    params: list[torch.Tensor],
    vs: list[torch.Tensor],
) -> torch.Tensor:
    r""":math:`(J_i v)^\top \Lambda_i (J_i v) = \|B_i^\top J_i v\|^2` per sample."""
    from .losses import column, output_curvature

    try:
        out, jv = _forward_jvp(fwd, x, params, vs)
    except Exception:  # no forward-mode rule: the double-vjp trick
        with torch.enable_grad():
            out = fwd(x)
            jv = _jvp(out, params, vs, create_graph=False)
    _check_outputs(out)
    m = out.shape[0]
    if jv is None:
        return torch.zeros(m, dtype=torch.float64)
    jv = jv.detach().reshape(m, -1).double()
    sqrt = output_curvature(loss, out.detach(), y).sqrt
    if isinstance(sqrt, torch.Tensor):
        z = torch.einsum("bcr,bc->br", sqrt.to(jv), jv)
        return z.square().sum(1).cpu()
    q = torch.zeros(m, dtype=torch.float64, device=jv.device)
    for r in range(sqrt.shape[2]):
        q += (column(sqrt, r).to(jv) * jv).sum(1).square()
    return q.cpu()


def _check_outputs(out: torch.Tensor) -> None:
    if not bool(torch.isfinite(out.detach()).all()):
        raise FloatingPointError("model outputs are not finite on the batch")


def _hessian_quotients(
    loss: object,
    fwd: nn.Module,
    x: object,
    y: object,
    params: list[torch.Tensor],
    vs: list[torch.Tensor],
) -> torch.Tensor:
    r""":math:`v^\top \nabla^2 l_i v` per sample: :math:`d = (\nabla l_i \cdot v)_i` by the
    double-vjp trick (with its graph), then the same for d."""
    from .losses import per_sample_losses

    out = fwd(x)
    _check_outputs(out)
    losses = per_sample_losses(loss, out, y).reshape(-1)
    d = _jvp(losses, params, vs, create_graph=True)
    if d is None or not d.requires_grad:
        return torch.zeros(losses.shape[0], dtype=torch.float64)
    e = _jvp(d, params, vs, create_graph=False)
    if e is None:
        return torch.zeros(losses.shape[0], dtype=torch.float64)
    return e.detach().double().cpu()


def tracked_sharpness(
    model: nn.Module,
    loss: object,
    inputs: object,
    targets: object,
    vector: torch.Tensor,
    *,
    kind: str = "ggn",
    n: int | None = None,
    forward_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] | None = None,
) -> TrackedSharpness:
    r"""The Rayleigh quotient of ``vector`` on the batch ``(inputs, targets)``, per sample.

    See the module docstring for the formula, its unbiasedness and its standard error.

    Args:
        model: the network.
        loss: a loss supported by :mod:`torch_coherence.curvature.losses` (e.g.
            ``nn.CrossEntropyLoss()``, ``nn.MSELoss()``).
        inputs, targets: one batch of m examples, drawn independently of ``vector`` (e.g.
            with a private generator) for the value to be unbiased.
        vector: flat, with one entry per parameter in the order of ``params`` (the
            ``vector`` of a :class:`~torch_coherence.curvature.DatasetSharpness`); it is
            normalised here.
        kind: ``"ggn"`` or ``"hessian"``: the matrix whose quotient is taken.
        n: the size of the data set the batch was drawn from without replacement (the
            finite-population factor of the standard error); ``None``: no correction.
        forward_fn: ``forward_fn(model, inputs) -> outputs`` for non-tensor inputs.
        params: the parameters (default: all with ``requires_grad``).

    Returns:
        :class:`TrackedSharpness`.

    Raises:
        ValueError / TypeError: naming the argument (``kind``, ``vector`` of the wrong size,
            zero or not finite, ``n`` below the batch size, an unsupported loss).
        FloatingPointError: the model's outputs or the quotients are not finite.
    """
    from .._state import preserved_state
    from .gram import Forward
    from .losses import check_loss
    from .sharpness import _measured_params, _start_vector, data_length

    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_loss(loss)
    plist = _measured_params(model, params)
    sizes = [p.numel() for p in plist]
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"vector must be a torch.Tensor, got {type(vector).__name__}")
    v = _start_vector(vector, sum(sizes), None)  # checks size, finiteness, non-zero
    v = v / torch.linalg.vector_norm(v)
    m = data_length((inputs, targets))
    if m < 1:
        raise ValueError("inputs: the batch is empty")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < m):
        raise ValueError(f"n must be an int >= the batch size {m}, got {n!r}")
    with preserved_state(model), torch.enable_grad():
        vs = [c.view(p.shape).to(p) for c, p in zip(torch.split(v, sizes), plist, strict=True)]
        fn = _ggn_quotients if kind == "ggn" else _hessian_quotients
        q = fn(loss, Forward(model, forward_fn), inputs, targets, plist, vs)
    if not bool(torch.isfinite(q).all()):
        raise FloatingPointError(f"a per-sample {kind} quotient is not finite")
    value = float(q.mean())
    stderr = math.nan
    if m > 1:
        fpc = 1.0 if n is None else max(1.0 - m / n, 0.0)
        stderr = float(q.std(unbiased=True)) / math.sqrt(m) * math.sqrt(fpc)
    return TrackedSharpness(value, stderr, m, n, kind, q, time.perf_counter() - t0)
