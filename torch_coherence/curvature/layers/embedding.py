r"""``nn.Embedding``: a = one-hot ids, so :math:`a_{i,t}\cdot a_{j,u} = [id_{i,t} = id_{j,u}]`.

Tokens equal to ``padding_idx`` get no gradient (mapped to id -1, which matches nothing).
Not covered: ``max_norm`` (renormalises the weight in place during the forward) and
``scale_grad_by_freq`` (the gradient depends on the whole batch's token counts). An embedding
called on ids without the sample axis (positional embeddings of ``torch.arange(T)``) has one
output shared by every sample; when it is added to a per-sample tensor the engine records the
addition with the output expanded to the sample axis (``gram._ReadWatch``), which makes the
call an ordinary batched one. Used any other way, a call whose ids do not start with the
probe's m samples is declined, and when T = m the self-check (:mod:`..selfcheck`) finds it.

Weight tying (GPT-style output layers, ``F.linear(h, emb.weight)`` or an ``nn.Linear`` whose
``weight`` is the embedding's). The weight W (V, d) is read twice, and sample i's gradient row
is the sum of both uses (``docs/theory.md`` §3):

.. math::

    G_{ir} = \sum_t e_{id_{i,t}}\, \delta^{E\top}_{ir,t}
           + \sum_u \delta^{L}_{ir,u}\, h_{i,u}^\top \qquad (V \times d),

:math:`\delta^E` the gradient of the embedding output (d), :math:`\delta^L` that of the
linear output (V), h the linear input. The engine records each ``F.linear`` read of W as one
more call of the embedding (``tag = "linear"``, float input) and :meth:`EmbeddingRule.combine`
forms :math:`K_{ir,js} = \langle G_{ir}, G_{js}\rangle` with the cross terms between the two
uses included. Neither use alone has a cheap ghost form (the linear use costs :math:`T^2 V` a
pair), so the rows are materialised, a slice of the vocabulary at a time
(:data:`TIED_CHUNK_BYTES`): :math:`K = \sum_c G^{(c)} G^{(c)\top}` over vocabulary slices c,
each slice built from :math:`\delta^L_{:,c}` and the ids that fall into it (cost
:math:`m R V T d` for the rows and :math:`(mR)^2 V d` for K, memory one slice; products in
the model's dtype, the slices' Grams summed in float64). The block
is then handed on as exact rows: :math:`G` itself when :math:`V d \le m R`, otherwise
:math:`L = U\Lambda^{1/2}` from :math:`K = U \Lambda U^\top` (float64; :math:`LL^\top = K` to
rounding), mR numbers a row instead of Vd. An ``nn.Linear`` tied this way is not covered
itself; its bias, if any, goes to the fallback. Any other read of W (``h @ W.T``) still
sends the embedding to the fallback.
"""

from __future__ import annotations

import torch
from torch import nn

from ...linalg import symmetric_eigh
from . import Piece, register

#: Bytes of one vocabulary slice of the tied rows (float64) held at once.
TIED_CHUNK_BYTES = 128 * 2**20


class EmbeddingRule:
    types = (nn.Embedding,)
    #: the weight may also be read by ``F.linear`` elsewhere (weight tying); see module doc
    tied = True

    def supports(self, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        if not w:
            return None
        R, m = grad.shape[:2]
        V, dim = module.weight.shape
        if x.is_floating_point():  # a tied read F.linear(x, weight): x (m, ..., d)
            if x.shape[-1] != dim or grad.shape[-1] != V:
                return None
            h = x.reshape(m, -1, dim)
            return [Piece(a=h, d=grad.reshape(R, m, -1, V).transpose(0, 1))]
        ids = x.reshape(m, -1).long()
        if module.padding_idx is not None:
            ids = torch.where(ids == module.padding_idx, torch.full_like(ids, -1), ids)
        d = grad.reshape(R, m, -1, grad.shape[-1]).transpose(0, 1)
        return [Piece(a=ids, d=d, index=True)]

    def combine(self, module: nn.Module, per_call: list[list[Piece]]) -> list[list[Piece]]:
        """Unchanged without a tied read; else one exact rows piece for all calls together."""
        pieces = [p for call in per_call for p in call]
        if all(p.index for p in pieces):
            return per_call
        emb = [(p.a, p.d) for p in pieces if p.index]
        lin = [(p.a, p.d) for p in pieces if not p.index]
        V, dim = module.weight.shape
        m, R = pieces[0].d.shape[:2]
        if V * dim <= m * R:
            rows = tied_rows(emb, lin, 0, V, dim)
            return [[Piece(rows=rows.reshape(m, R, -1).double())]]
        return [[Piece(rows=gram_root(tied_gram(emb, lin, V, dim)).view(m, R, m * R))]]


def tied_rows(
    emb: list[tuple[torch.Tensor, torch.Tensor]],
    lin: list[tuple[torch.Tensor, torch.Tensor]],
    v0: int,
    v1: int,
    dim: int,
) -> torch.Tensor:
    r"""Rows :math:`G_{ir}` restricted to vocabulary entries [v0, v1), (m, R, v1 - v0, d), in
    the model's dtype.

    ``emb``: (ids (m, T), delta (m, R, T, d)) per embedding call; ``lin``: (h (m, T, d),
    delta (m, R, T, V)) per tied linear read.
    """
    c = v1 - v0
    ref = (emb or lin)[0][1]
    m, R = ref.shape[:2]
    rows = torch.zeros(m, R, c, dim, dtype=ref.dtype, device=ref.device)
    flat = rows.view(m * R * c, dim)
    for h, d in lin:  # sum_u delta_u[v0:v1] h_u^T, a bmm per sample
        dl = d[..., v0:v1].permute(0, 1, 3, 2).reshape(m, R * c, -1)
        rows.view(m, R * c, dim).baddbmm_(dl, h)
    for ids, d in emb:  # e_id delta^T for the ids in [v0, v1)
        hit = (ids >= v0) & (ids < v1)  # (m, T); padding (-1) never hits
        if not bool(hit.any()):
            continue
        base = torch.arange(m * R, device=ids.device).view(m, R, 1) * c
        idx = (base + (ids - v0).clamp_min(0).unsqueeze(1)).expand(m, R, ids.shape[1])
        sel = hit.unsqueeze(1).expand(m, R, ids.shape[1])
        flat.index_add_(0, idx[sel], d[sel].to(rows.dtype))
    return rows


def tied_gram(
    emb: list[tuple[torch.Tensor, torch.Tensor]],
    lin: list[tuple[torch.Tensor, torch.Tensor]],
    V: int,
    dim: int,
) -> torch.Tensor:
    """K (m R, m R) of the tied weight: slices' Grams in the model's dtype, summed in float64."""
    m, R = (emb or lin)[0][1].shape[:2]
    T = max([h.shape[1] for h, _ in lin] + [1])
    per_entry = 8 * m * R * max(dim, T)  # (the float64 bound holds for any dtype)
    c = max(1, min(V, TIED_CHUNK_BYTES // per_entry))
    K = torch.zeros(m * R, m * R, dtype=torch.float64)
    for v0 in range(0, V, c):
        X = tied_rows(emb, lin, v0, min(V, v0 + c), dim).reshape(m * R, -1)
        K += X @ X.T if X.dtype == torch.float64 else (X @ X.T).double()
    return K


def gram_root(K: torch.Tensor) -> torch.Tensor:
    r""":math:`L = U \max(\Lambda, 0)^{1/2}` with :math:`K = U\Lambda U^\top`, so
    :math:`LL^\top = K` up to rounding (K symmetric positive semi-definite)."""
    evals, evecs = symmetric_eigh((K + K.T) / 2)
    return evecs * evals.clamp_min(0).sqrt()


register(EmbeddingRule())
