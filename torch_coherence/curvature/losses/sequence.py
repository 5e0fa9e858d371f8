r"""Cross-entropy (and NLL) over sequences: a sample is a sequence, its loss a mean over tokens.

Layouts. Logits (m, T, V) with class-index targets (m, T), as language models emit them, or
PyTorch's (m, V, T) (more position axes are allowed: (m, *pos, V) or (m, V, *pos), flattened
into T). When both readings fit (every position axis equal to V), PyTorch's is used, because
it is what ``nn.CrossEntropyLoss`` itself computes.

Per-sample loss. With per-token losses :math:`\ell_{it}` (``reduction="none"``, label
smoothing included) and weights :math:`w_{it} = w_{y_{it}}\,[y_{it} \ne \text{ignore}]`
(:math:`w_y = 1` without class weights), sequence i's loss is

.. math::

    l_i = \sum_t \omega_{it}\, \ell_{it}, \qquad
    \omega_{it} = w_{it} / \textstyle\sum_u w_{iu} \ (\text{mean}), \quad
    \omega_{it} = w_{it} \ (\text{sum}).

Without class weights :math:`\omega_{it} = 1/T_i`, :math:`T_i` the sequence's non-ignored
tokens: the mean over its tokens. PyTorch's mean divides by the non-ignored tokens of the
whole batch instead, so :math:`\frac1m \sum_i l_i` equals the training loss exactly when every
sequence has the same :math:`\sum_t w_{it}` (the same count :math:`T_i`), and otherwise weighs
each sequence equally where the training loss weighs each token equally. With
``reduction="sum"`` :math:`\sum_i l_i` is the training loss. A sequence with no
non-ignored token has no loss and is refused.

Output Hessian. :math:`\Lambda_i = \mathrm{blockdiag}_t(\omega_{it}\Lambda_{it})`,
:math:`\Lambda_{it} = \mathrm{diag}(p_{it}) - p_{it}p_{it}^\top` (label smoothing does not enter;
for NLL :math:`p = e^z`, see :mod:`.classification`). Its factor is the stack of the per-token
factors scaled by :math:`\sqrt{\omega_{it}}` (docs/theory.md §9), built column by column
(:mod:`.factor`).

Top-k factor and its error (docs/theory.md §9). For one token with probabilities p, let K be
the k kept classes and :math:`R` the rest, :math:`s = \sum_{c\in R} p_c`,
:math:`u = p_R / s` (p restricted to R, renormalised). With the label y drawn from p,
:math:`\Lambda = E[(e_y - p)(e_y - p)^\top]`. Splitting the expectation on whether
:math:`y \in R` and replacing :math:`e_y` there by its conditional mean u,

.. math::

    \tilde\Lambda = \sum_{c\in K} p_c (e_c - p)(e_c - p)^\top + s\,(u - p)(u - p)^\top,

a factor of k + 1 columns :math:`\sqrt{p_c}(e_c - p)` and :math:`p_R/\sqrt s - \sqrt s\,p`.
The conditional-variance identity gives the error exactly:

.. math::

    E = \Lambda - \tilde\Lambda = \sum_{y\in R} p_y (e_y - u)(e_y - u)^\top
      = \mathrm{diag}(p_R) - p_R p_R^\top / s ,

so :math:`0 \preceq E \preceq \mathrm{diag}(p_R)` and
:math:`\|\Lambda - \tilde\Lambda\|_2 \le \max_{c \in R} p_c = p_{(k+1)}`, the largest
discarded probability; :math:`\tilde\Lambda \preceq \Lambda`, so every truncated curvature
(each :math:`H_i`, :math:`\lambda_1(H_i)`, the GGN) is a lower bound of the exact one. With
k = V - 1 (or all V classes kept) the factor is exact. Since
:math:`\|\Lambda\|_2 \ge \mu := \max_c p_c(1 - p_c)` (a diagonal entry), keeping every class
with :math:`p_c > \text{tol}\cdot\mu` guarantees
:math:`\|\Lambda - \tilde\Lambda\|_2 \le \text{tol}\,\|\Lambda\|_2`; k is chosen so per token
(capped at ``max_k``), and the report carries the largest
:math:`p_{(k+1)}/\mu` over tokens (at most tol unless the cap bit). For a confident model k
is small; for near-uniform predictions (an untrained language model) no small k meets a
small tol, because then :math:`\Lambda \approx \frac1V(I - \mathbf 1\mathbf 1^\top/V)` has a
flat spectrum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .factor import SampledSequenceFactor, TopKTokenFactor

#: Classes kept per token at most by the top-k factor.
MAX_K = 64


def class_last(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether the class axis of ``outputs`` is the last one (else PyTorch's axis 1)."""
    if outputs.dim() < 3:
        return True
    pos = tuple(targets.shape[1:])
    torch_layout = tuple(outputs.shape[2:]) == pos
    last_layout = tuple(outputs.shape[1:-1]) == pos
    if not torch_layout and not last_layout:
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} matches neither (m, *pos) of outputs "
            f"{tuple(outputs.shape)} read as (m, *pos, V) nor as PyTorch's (m, V, *pos)"
        )
    return not torch_layout


def tokens(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs as (m, T, V) and targets as (m, T)."""
    m = outputs.shape[0]
    if class_last(outputs, targets):
        z = outputs.reshape(m, -1, outputs.shape[-1])
    else:
        z = outputs.reshape(m, outputs.shape[1], -1).transpose(1, 2)
    return z, targets.reshape(m, -1)


def check_targets(loss: nn.Module, z: torch.Tensor, y: torch.Tensor) -> None:
    """Class-index targets in range (ignore_index allowed)."""
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(
            f"targets: {type(loss).__name__} on sequences needs integer class indices "
            f"(m, T), got dtype {y.dtype}"
        )
    V = z.shape[-1]
    bad = (y != loss.ignore_index) & ((y < 0) | (y >= V))
    if bad.any():
        idx = bad.reshape(y.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"targets: class indices must lie in [0, {V}) or equal ignore_index="
            f"{loss.ignore_index}; samples {idx[:10]} do not"
        )


def token_weights(loss: nn.Module, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\omega_{it}` (m, T) float64 (module docstring)."""
    valid = y != loss.ignore_index
    w = valid.double()
    if loss.weight is not None:
        w = w * loss.weight.to(y.device).double()[y.clamp_min(0)]
    if loss.reduction == "sum":
        return w
    tot = w.sum(1, keepdim=True)
    empty = (tot == 0).flatten()
    if empty.any():
        idx = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"targets: sequences {idx[:10]} have no token other than ignore_index "
            f"{loss.ignore_index} (no loss); drop them from the probe"
        )
    return w / tot


def probabilities(loss: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """p (m, T, V) float64: softmax of logits (CE) or exp of log-probabilities (NLL)."""
    z = z.detach().double()
    return z.softmax(-1) if isinstance(loss, nn.CrossEntropyLoss) else z.exp()


def unweighted_losses(loss: nn.Module, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """``reduction="none"`` losses without class weights (torch's layout (m, V, ...))."""
    if isinstance(loss, nn.CrossEntropyLoss):
        return F.cross_entropy(
            outputs,
            targets,
            reduction="none",
            label_smoothing=loss.label_smoothing,
            ignore_index=loss.ignore_index,
        )
    return F.nll_loss(outputs, targets, reduction="none", ignore_index=loss.ignore_index)


def per_sample_losses(
    loss: nn.Module, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per-sequence losses l_i (m,) (module docstring)."""
    z, y = tokens(outputs, targets)
    check_targets(loss, z, y)
    el = unweighted_losses(loss, z.transpose(1, 2), y)  # (m, V, T): torch's layout
    omega = token_weights(loss, y).to(el.dtype)
    return (el * omega).sum(1)


def per_sample_gradients(
    loss: nn.Module, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    r""":math:`\partial l_i / \partial z_i` (m, C) float64 in the outputs' layout, in closed form.

    Per token, with label smoothing :math:`\varepsilon`, :math:`\ell = -(1-\varepsilon)\log p_y
    - \frac{\varepsilon}{V}\sum_c \log p_c` has gradient :math:`p - (1-\varepsilon)e_y -
    \varepsilon/V` in the logits (CE); NLL on log-probabilities has :math:`-e_y`. Times
    :math:`\omega_{it}` (0 on ignored tokens). Class weights with label smoothing are refused
    before this is reached.
    """
    z, y = tokens(outputs, targets)
    check_targets(loss, z, y)
    omega = token_weights(loss, y).unsqueeze(2)
    valid = (y != loss.ignore_index).unsqueeze(2)
    yc = y.clamp_min(0).unsqueeze(2)
    if isinstance(loss, nn.CrossEntropyLoss):
        eps = float(loss.label_smoothing)
        g = probabilities(loss, z)
        if eps:
            g.sub_(eps / z.shape[-1])
        g.scatter_add_(2, yc, torch.full(yc.shape, eps - 1.0, dtype=g.dtype, device=g.device))
    else:
        g = torch.zeros(z.shape, dtype=torch.float64, device=z.device)
        g.scatter_(2, yc, -1.0)
    g.mul_(omega * valid)
    if not class_last(outputs, targets):
        g = g.transpose(1, 2)  # back to torch's (m, V, positions)
    return g.reshape(outputs.shape[0], -1)


def _columns(k: torch.Tensor, has_rest: torch.Tensor, kmax: int) -> tuple[torch.Tensor, ...]:
    """Column table (tok, cls) (m, R) from per-token class counts; pads with tok = -1."""
    m, _T = k.shape
    slot = torch.arange(kmax + 1, device=k.device)
    n = k + has_rest.long()
    valid = slot.view(1, 1, -1) < n.unsqueeze(2)  # (m, T, kmax + 1)
    i, t, j = valid.nonzero(as_tuple=True)  # lexicographic: sample, token, slot
    counts = valid.flatten(1).sum(1)
    R = max(int(counts.max()), 1)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(i.numel(), device=k.device) - start[i]
    tok = torch.full((m, R), -1, dtype=torch.long, device=k.device)
    cls = torch.full((m, R), -1, dtype=torch.long, device=k.device)
    tok[i, pos] = t
    cls[i, pos] = torch.where(j < k[i, t], j, torch.full_like(j, -1))
    return tok, cls


def truncated_factor(
    loss: nn.Module,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    tol: float,
    max_k: int | None = MAX_K,
) -> tuple[TopKTokenFactor, float]:
    """Top-k factor with per-token k (module docstring) and the relative error bound.

    ``tol = 0`` and ``max_k = None`` keep every class: the exact factor (V columns a token).
    """
    z, y = tokens(outputs, targets)
    check_targets(loss, z, y)
    omega = token_weights(loss, y)
    p = probabilities(loss, z)
    m, _T, V = p.shape
    kmax = V if max_k is None else min(V, max_k)
    top, topidx = p.topk(kmax, dim=-1)  # sorted, decreasing
    mu = (p * (1 - p)).amax(-1)
    k = (top > tol * mu.unsqueeze(-1)).sum(-1).clamp_min(1)
    keep = torch.arange(kmax).view(1, 1, -1) < k.unsqueeze(-1)
    rest = (p.sum(-1) - (top * keep).sum(-1)).clamp_min(0.0)
    # the remainder sum by cancellation is inaccurate when it is tiny: sum what is left
    small = rest < 1e-6
    if small.any():
        prest = p.scatter(2, topidx, top * (~keep))
        rest = torch.where(small, prest.sum(-1), rest)
    has_rest = (k < V) & (rest > 0)
    active = omega > 0
    k = k * active
    has_rest = has_rest & active
    nxt = torch.where(k < kmax, top.gather(2, k.clamp(max=kmax - 1).unsqueeze(2)).squeeze(2), 0.0)
    if kmax < V:  # the largest class beyond the cap
        beyond = p.scatter(2, topidx, torch.zeros_like(top)).amax(-1)
        nxt = torch.where(k >= kmax, beyond, nxt)
    nxt = torch.where(has_rest, nxt, torch.zeros_like(nxt))
    rel = torch.where(mu > 0, nxt / mu.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(mu))
    tok, slot = _columns(k, has_rest, kmax)
    idx = torch.arange(m).unsqueeze(1)
    cls = torch.where(slot >= 0, topidx[idx, tok.clamp_min(0), slot.clamp_min(0)], slot)
    fac = TopKTokenFactor(
        p, omega, topidx, k, rest, tok, cls, tuple(outputs.shape), class_last(outputs, targets)
    )
    bound = float(rel.max()) if rel.numel() else 0.0
    return fac, bound


def sampled_factor(
    loss: nn.Module,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    samples: int,
    generator: torch.Generator,
) -> SampledSequenceFactor:
    """S sampled columns per sequence (see :class:`.factor.SampledSequenceFactor`)."""
    z, y = tokens(outputs, targets)
    check_targets(loss, z, y)
    omega = token_weights(loss, y)
    p = probabilities(loss, z)
    m, T, V = p.shape
    flat = p.reshape(-1, V).cpu()
    labels = torch.multinomial(flat, samples, replacement=True, generator=generator)
    labels = labels.to(p.device).view(m, T, samples)
    dtype = torch.float32 if outputs.dtype == torch.float32 else torch.float64
    return SampledSequenceFactor(
        p, omega, labels, tuple(outputs.shape), class_last(outputs, targets), dtype
    )
