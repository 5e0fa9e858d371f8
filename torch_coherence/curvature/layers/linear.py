r"""``nn.Linear``: :math:`y_{i,t} = W a_{i,t} + b`, ghost input a = the layer input.

Leading axes after the sample axis are flattened into t, so
:math:`g_{ir} = \sum_t \delta_{ir,t} a_{i,t}^\top` (``docs/theory.md`` §3).
"""

from __future__ import annotations

import torch
from torch import nn

from . import Piece, register


class LinearRule:
    types = (nn.Linear,)

    def supports(self, module: nn.Module) -> bool:
        return True

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        R, m = grad.shape[:2]
        a = x.reshape(m, -1, x.shape[-1])
        d = grad.reshape(R, m, -1, grad.shape[-1]).transpose(0, 1)
        if not w:
            return [Piece(a=a.new_ones((*a.shape[:-1], 1)), d=d)]
        return [Piece(a=a, d=d, ones=b)]


register(LinearRule())
