r"""``nn.MultiheadAttention``: its four projections as Linear ghost rules.

With a shared embedding size E the module computes :math:`q = x_q W_q^\top + b_q`,
:math:`k = x_k W_k^\top + b_k`, :math:`v = x_v W_v^\top + b_v` (``in_proj_weight`` stacked as
:math:`[W_q; W_k; W_v]`), attention per head and :math:`y = o W_o^\top + b_o` (``out_proj``).
Each projection is linear in its own disjoint slice of the parameters, so K of the module is
the sum of four Linear ghost Grams (:mod:`.linear`; ``docs/theory.md`` §3) with inputs
:math:`x_q, x_k, x_v, o` and output gradients :math:`\delta_q, \delta_k, \delta_v, \delta_y`.

These inputs and gradients live inside ``F.multi_head_attention_forward``, so during the
recording pass the module runs :func:`recording_forward`, a re-implementation with explicit
projections (math attention: softmax of :math:`qk^\top/\sqrt{d_h}` plus the additive masks).
Its output is compared with the module's own ``forward`` on the same call; where they differ
(a configuration the re-implementation does not reproduce) the module is declined and goes to
the fallback. Covered: ``kdim = vdim = embed_dim``, no ``bias_k``/``bias_v``, no
``add_zero_attn``, eval mode (no dropout), ``attn_mask`` / ``key_padding_mask`` boolean or
additive, ``is_causal``, ``batch_first`` either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import Piece, register
from .linear import LinearRule


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


class AttentionRule:
    types = (nn.MultiheadAttention,)

    def supports(self, module: nn.Module) -> bool:
        return (
            module._qkv_same_embed_dim
            and module.in_proj_weight is not None
            and module.bias_k is None
            and not module.add_zero_attn
        )

    def params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        out = {"in_proj_weight": module.in_proj_weight, "out_proj.weight": module.out_proj.weight}
        if module.in_proj_bias is not None:
            out["in_proj_bias"] = module.in_proj_bias
            out["out_proj.bias"] = module.out_proj.bias
        return out

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        return LinearRule().pieces(module, x, grad, w, b)

    def recording_forward(self, module: nn.Module, rec: Callable) -> Callable:
        """A forward with explicit projections, each recorded as ``rec(tag, input, output)``."""

        def forward(
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            key_padding_mask: torch.Tensor | None = None,
            need_weights: bool = True,
            attn_mask: torch.Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
        ):
            call = (query, key, value, key_padding_mask, need_weights, attn_mask)
            with torch.no_grad():
                ref = type(module).forward(
                    module, *call, average_attn_weights=average_attn_weights, is_causal=is_causal
                )
            if module.training or query.dim() != 3:
                rec.decline("the attention re-implementation covers eval-mode batched calls")
                return type(module).forward(
                    module, *call, average_attn_weights=average_attn_weights, is_causal=is_causal
                )
            xs = [t if module.batch_first else t.transpose(0, 1) for t in (query, key, value)]
            E, H = module.embed_dim, module.num_heads
            W, bias = module.in_proj_weight, module.in_proj_bias
            proj = []
            for i, tag in enumerate("qkv"):
                bi = None if bias is None else bias[i * E : (i + 1) * E]
                proj.append(rec(tag, xs[i], F.linear(xs[i], W[i * E : (i + 1) * E], bi)))
            m, L, S = xs[0].shape[0], xs[0].shape[1], xs[1].shape[1]
            q, k, v = (t.reshape(m, -1, H, E // H).transpose(1, 2) for t in proj)
            scores = q @ k.transpose(-1, -2) / math.sqrt(E // H)
            mask = _additive(attn_mask, scores.dtype)
            if is_causal and mask is None:
                causal = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
                mask = _additive(causal, scores.dtype)
            if mask is not None:
                scores = scores + (mask.view(m, H, L, S) if mask.dim() == 3 else mask)
            kpm = _additive(key_padding_mask, scores.dtype)
            if kpm is not None:
                scores = scores + kpm.view(m, 1, 1, S)
            attn = scores.softmax(-1)
            o = (attn @ v).transpose(1, 2).reshape(m, L, E)
            y = rec("out", o, F.linear(o, module.out_proj.weight, module.out_proj.bias))
            y = y if module.batch_first else y.transpose(0, 1)
            tol = 1e-4 if y.dtype != torch.float64 else 1e-10
            scale = float(ref[0].abs().max()) if ref[0].numel() else 1.0
            if not bool(torch.allclose(y, ref[0], rtol=tol, atol=tol * scale)):
                rec.decline("the attention re-implementation did not reproduce its output")
                return type(module).forward(
                    module, *call, average_attn_weights=average_attn_weights, is_causal=is_causal
                )
            weights = None
            if need_weights:
                weights = attn.mean(1) if average_attn_weights else attn
            return y, weights

        return forward


register(AttentionRule())
