r"""``nn.Embedding``: a = one-hot ids, so :math:`a_{i,t}\cdot a_{j,u} = [id_{i,t} = id_{j,u}]`.

Tokens equal to ``padding_idx`` get no gradient (mapped to id -1, which matches nothing).
Not covered: ``max_norm`` (renormalises the weight in place during the forward) and
``scale_grad_by_freq`` (the gradient depends on the whole batch's token counts). An embedding
called on ids without the sample axis (positional embeddings of ``torch.arange(T)``) has one
output shared by every sample; when it is added to a per-sample tensor the engine records the
addition with the output expanded to the sample axis (``gram._ReadWatch``), which makes the
call an ordinary batched one. Used any other way, a call whose ids do not start with the
probe's m samples is declined, and when T = m the self-check (:mod:`..selfcheck`) finds it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import Piece, register


class EmbeddingRule:
    types = (nn.Embedding,)

    def supports(self, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        if not w:
            return None
        R, m = grad.shape[:2]
        ids = x.reshape(m, -1).long()
        if module.padding_idx is not None:
            ids = torch.where(ids == module.padding_idx, torch.full_like(ids, -1), ids)
        d = grad.reshape(R, m, -1, grad.shape[-1]).transpose(0, 1)
        return [Piece(a=ids, d=d, index=True)]


register(EmbeddingRule())
