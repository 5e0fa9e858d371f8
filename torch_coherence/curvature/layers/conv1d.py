r"""Hugging Face ``Conv1D`` (GPT-2 and its relatives): a linear layer with its weight transposed.

``transformers.pytorch_utils.Conv1D(nf, nx)`` holds ``weight`` (nx, nf) and ``bias`` (nf,) and
computes ``addmm(bias, x.view(-1, nx), weight)``, i.e. :math:`y_{i,t} = W^\top a_{i,t} + b`
with the leading axes after the sample axis flattened into t. Its per-sample weight gradient
:math:`\sum_t a_{i,t}\,\delta_{ir,t}^\top` is the transpose of ``nn.Linear``'s
:math:`\sum_t \delta_{ir,t} a_{i,t}^\top`, and a transpose keeps every inner product, so the
block Gram is the Linear rule's ghost Gram with the same ghost pair (a = the layer input,
d = the output gradient; ``docs/theory.md`` §3): this rule reuses :class:`.linear.LinearRule`.

The class is matched by its qualified name (the maths does not import ``transformers``; the
older home ``transformers.modeling_utils`` is listed too) and then by structure: a 2-D weight
(nx, nf) with ``nf`` (and ``nx`` where present) matching it, a bias (nf,), and the stock
``forward`` (a subclass overriding it, a class whose ``forward`` was replaced, or an instance
with its own ``forward`` goes to the ``torch.func`` fallback).
"""

from __future__ import annotations

from torch import nn

from . import register
from .linear import LinearRule

#: Where ``Conv1D`` is defined in the ``transformers`` versions this rule describes.
CONV1D_NAMES = ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")


def _stock_base(cls: type) -> type | None:
    """The class in ``cls``'s MRO that is a registered ``Conv1D``, or None."""
    named = (c for c in cls.__mro__ if f"{c.__module__}.{c.__qualname__}" in CONV1D_NAMES)
    return next(named, None)


class Conv1DRule(LinearRule):
    types = ()
    names = CONV1D_NAMES

    def supports(self, module: nn.Module) -> bool:
        base = _stock_base(type(module))
        fwd = type(module).forward
        if base is None or "forward" in vars(module):
            return False
        if fwd.__module__ != base.__module__ or fwd.__qualname__ != f"{base.__qualname__}.forward":
            return False
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2:
            return False
        if getattr(module, "nf", None) != w.shape[1]:
            return False
        if getattr(module, "nx", w.shape[0]) != w.shape[0]:
            return False
        return isinstance(b, nn.Parameter) and tuple(b.shape) == (w.shape[1],)


register(Conv1DRule())
