r"""Layer rules of the Gram engine, registered per module type and deciding support up front.

For a layer whose weight gradient of sample i and factor row r is
:math:`g_{ir} = \sum_t \delta_{ir,t}\, a_{i,t}^\top` (t a sequence / spatial axis, delta the
gradient of the layer output), the contribution to the block Gram is (``docs/theory.md`` §3)

.. math::

    K_{ir,js} \mathrel{+}= \sum_{t,u} (\delta_{ir,t} \cdot \delta_{js,u})\,(a_{i,t} \cdot a_{j,u}),

the "ghost" Gram of Goodfellow (2015, "Efficient per-example gradient computations") and
Li et al. (2022, "Large language models can be strong differentially private learners").
A bias adds :math:`\sum_{t,u} \delta_{ir,t} \cdot \delta_{js,u}`: the same rule with a
constant 1 appended to every :math:`a_{i,t}`.

A rule (:class:`LayerRule`) declares ``supports(module)``: a configuration-level decision made
*before anything runs* (as Opacus registers its grad samplers per module type and BackPACK
checks a module before extending it). A module no rule supports has its parameters computed by
the ``torch.func`` fallback. Per call, ``pieces(module, x, grad, w, b)`` turns the recorded input
``x`` and the output gradients ``grad`` (R, m, ...) into one or more :class:`Piece` objects:
ghost pairs ``(a, d)`` (concatenated along t over several calls of the module) or materialised
per-sample rows (summed over calls). It may still return ``None`` for an input it cannot treat
(the engine itself declines calls whose input or output does not start with the probe's m
samples), and that module then goes to the fallback as well. Two optional members: a rule
with ``combine(module, per_call)`` sees the pieces of all of a module's calls together (when
they are not independent terms), and ``tied = True`` lets the module's weight be shared with
other modules, every ``F.linear`` read of it being recorded as a call of this module
(weight tying, :mod:`.embedding`).

Registered rules: :mod:`.linear` (``nn.Linear``), :mod:`.conv` (``nn.Conv1d``/``nn.Conv2d``, any
groups, padding and padding mode), :mod:`.embedding` (``nn.Embedding``), :mod:`.norm` (affine
parameters of ``nn.LayerNorm``, ``nn.RMSNorm``, eval-mode ``nn.BatchNorm1d/2d``),
:mod:`.attention` (``nn.MultiheadAttention``), :mod:`.conv1d` (the transposed-weight linear
layer ``Conv1D`` of Hugging Face GPT-2 and its relatives).

A rule may also name classes by their qualified name (``names``, kept in :data:`NAMED`)
instead of by type, for layers of frameworks the maths must not import: a class matches
when its ``__module__`` and ``__qualname__`` spell a registered name.

Lookup (:func:`find_rule`) follows the method resolution order, so a subclass of a registered
type (a user's ``class MyLinear(nn.Linear)``, the ``FSDPLinear`` that FSDP2's ``fully_shard``
makes) gets its base's rule, but only when it computes what the base computes: a subclass
whose ``forward`` is not the registered base's own goes to the fallback, since the rule's
maths describes the base's ``forward`` only. Excluded outright
(:data:`READ_BY_PARENT`): ``NonDynamicallyQuantizableLinear``, the ``out_proj`` of
``nn.MultiheadAttention``, whose weight its parent reads functionally and never through its
own ``forward``; the attention rule covers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

__all__ = [
    "READ_BY_PARENT",
    "LayerRule",
    "NAMED",
    "Piece",
    "REGISTRY",
    "find_rule",
    "register",
    "registered_base",
    "with_ones",
]


@dataclass
class Piece:
    """One contribution of a module call to K.

    Attributes:
        a: ghost input (m, T, k) float, or (m, T) integer ids when ``index``; None for rows.
        d: ghost output gradient (m, R, T, o); None for rows.
        rows: materialised per-sample gradient rows (m, R, P); None for a ghost pair.
        index: whether ``a`` holds embedding ids (inner product = equality of ids).
        key: the recorded computation inside the module it belongs to (set by the engine).
        ones: a bias: a constant 1 is appended to every ``a_t`` implicitly (the engine adds
            its term without concatenating a copy of ``a``).
    """

    a: torch.Tensor | None = None
    d: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    index: bool = False
    key: str = ""
    ones: bool = False


class LayerRule(Protocol):
    """What a registered layer rule provides (see the module docstring)."""

    types: tuple[type, ...]

    def supports(self, module: nn.Module) -> bool:
        """Whether this configuration of ``module`` is covered (decided before any pass)."""

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        """Contributions of one call with input ``x`` and output gradients ``grad`` (R, m, ...)."""


#: registered module type -> rule (looked up along the MRO by :func:`find_rule`).
REGISTRY: dict[type, LayerRule] = {}

#: qualified class name ("package.module.Class") -> rule, for classes that are not imported.
NAMED: dict[str, LayerRule] = {}

#: Subclasses of registered types whose parameters their parent module reads functionally.
READ_BY_PARENT: tuple[type, ...] = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def register(rule: LayerRule) -> LayerRule:
    """Register ``rule`` for each of its ``types`` (and the qualified ``names`` it may list)."""
    for t in rule.types:
        REGISTRY[t] = rule
    for name in getattr(rule, "names", ()):
        NAMED[name] = rule
    return rule


def _rule_of(cls: type) -> LayerRule | None:
    """The rule registered for exactly ``cls``, by type or by qualified name."""
    rule = REGISTRY.get(cls)
    return rule if rule is not None else NAMED.get(f"{cls.__module__}.{cls.__qualname__}")


def registered_base(cls: type) -> type | None:
    """The nearest class in ``cls``'s MRO with a registered rule, or None.

    None as well when ``cls`` (or a class between it and that base) overrides ``forward``: the
    rule describes the base's computation, not the subclass's.
    """
    if issubclass(cls, READ_BY_PARENT):
        return None
    for base in cls.__mro__:
        if _rule_of(base) is not None:
            return base if cls.forward is base.forward else None
    return None


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule covering ``module`` as configured, or None (fallback)."""
    base = registered_base(type(module))
    if base is None:
        return None
    rule = _rule_of(base)
    return rule if rule is not None and rule.supports(module) else None


def with_ones(a: torch.Tensor, with_weight: bool, with_bias: bool) -> torch.Tensor:
    """Append the constant input of a bias (or keep only it when the weight is not measured)."""
    if not with_weight:
        return a.new_ones((*a.shape[:-1], 1))
    if with_bias:
        return torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1)
    return a


from . import attention, conv, conv1d, embedding, linear, norm  # noqa: E402,F401  (registration)
