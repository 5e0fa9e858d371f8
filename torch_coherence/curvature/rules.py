r"""Per-layer Gram rules: a layer's per-sample gradients as (output-gradient, input) pairs.

For a layer whose weight gradient of sample i and factor row r is
:math:`g_{ir} = \sum_t \delta_{ir,t}\, a_{i,t}^\top` (t a sequence / spatial axis), the
contribution to the block Gram is (MATH.md §3)

.. math::

    K_{ir,js} \mathrel{+}= \sum_{t,u} (\delta_{ir,t} \cdot \delta_{js,u})\,(a_{i,t} \cdot a_{j,u}),

the "ghost" Gram of Goodfellow (2015, "Efficient per-example gradient computations") and
Li et al. (2022, "Large language models can be strong differentially private learners").
A bias adds :math:`\sum_{t,u} \delta_{ir,t} \cdot \delta_{js,u}`: it is the same rule with a
constant 1 appended to every :math:`a_{i,t}`.

* ``nn.Linear``: a = the input with leading axes after the batch axis flattened into t.
* ``nn.Conv1d/2d`` (groups = 1, zero padding, numeric padding): a = ``F.unfold`` patches
  (t = output position), delta = output gradient per position.
* ``nn.Embedding`` (no ``max_norm``): a = one-hot token ids, so
  :math:`a_{i,t} \cdot a_{j,u} = [\mathrm{id}_{i,t} = \mathrm{id}_{j,u}]`; tokens equal to
  ``padding_idx`` get no gradient.

A rule is registered per module type in :data:`RULES`; a rule returns ``None`` when the
module's configuration is not covered, and its parameters go to the ``torch.func`` fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GhostInput:
    """Layer input factors of one module call.

    Attributes:
        a: (m, T, k) float inputs, or (m, T) integer ids when ``index`` is true.
        index: whether ``a`` holds embedding ids (inner product = equality).
    """

    a: torch.Tensor
    index: bool = False


#: rule(module, input, with_weight, with_bias) -> GhostInput | None
Rule = Callable[[nn.Module, torch.Tensor, bool, bool], "GhostInput | None"]


def _with_ones(a: torch.Tensor, with_weight: bool, with_bias: bool) -> torch.Tensor:
    if not with_weight:
        return a.new_ones((*a.shape[:-1], 1))
    if with_bias:
        return torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1)
    return a


def linear_rule(mod: nn.Module, x: torch.Tensor, w: bool, b: bool) -> GhostInput | None:
    """nn.Linear: a_{i,t} = x_{i,t} (+ 1 for the bias)."""
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    return GhostInput(_with_ones(a, w, b))


def _conv_ok(mod: nn.Module) -> bool:
    return mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)


def _unfold2d(x: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """``F.unfold`` by strided slices (the CPU ``im2col`` kernel is far slower here).

    Returns (m, C k_h k_w, L) in ``F.unfold``'s order (channel-major, then kernel offsets).
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    xp = F.pad(x, (pw, pw, ph, ph))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [
        xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    out = torch.stack(cols, 2)  # (m, C, kh kw, ho, wo)
    return out.reshape(x.shape[0], -1, ho * wo)


def conv2d_rule(mod: nn.Module, x: torch.Tensor, w: bool, b: bool) -> GhostInput | None:
    """nn.Conv2d: a = unfolded patches (m, L, C_in k_h k_w)."""
    if not _conv_ok(mod) or x.dim() != 4:
        return None
    cols = _unfold2d(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    return GhostInput(_with_ones(cols.transpose(1, 2), w, b))


def conv1d_rule(mod: nn.Module, x: torch.Tensor, w: bool, b: bool) -> GhostInput | None:
    """nn.Conv1d as a (1, k) Conv2d."""
    if not _conv_ok(mod) or x.dim() != 3:
        return None
    cols = _unfold2d(
        x.unsqueeze(2),
        (1, mod.kernel_size[0]),
        (1, mod.dilation[0]),
        (0, mod.padding[0]),
        (1, mod.stride[0]),
    )
    return GhostInput(_with_ones(cols.transpose(1, 2), w, b))


def embedding_rule(mod: nn.Module, x: torch.Tensor, w: bool, b: bool) -> GhostInput | None:
    """nn.Embedding: ids (m, T); padding ids are mapped to -1 (matching nothing)."""
    if mod.max_norm is not None:
        return None
    ids = x.reshape(x.shape[0], -1).long()
    if mod.padding_idx is not None:
        ids = torch.where(ids == mod.padding_idx, torch.full_like(ids, -1), ids)
    return GhostInput(ids, index=True)


#: module type -> rule (exact type match; subclasses go to the fallback).
RULES: dict[type, Rule] = {
    nn.Linear: linear_rule,
    nn.Conv1d: conv1d_rule,
    nn.Conv2d: conv2d_rule,
    nn.Embedding: embedding_rule,
}


def output_positions(mod: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """Reshape an output gradient (R, m, ...) to (m, R, T, out) matching the rule's t axis."""
    R, m = grad.shape[:2]
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        g = grad.reshape(R, m, grad.shape[2], -1).transpose(2, 3)  # (R, m, L, out)
    else:
        g = grad.reshape(R, m, -1, grad.shape[-1])
    return g.transpose(0, 1)
