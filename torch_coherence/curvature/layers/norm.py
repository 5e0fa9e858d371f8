r"""Affine parameters of ``nn.LayerNorm``, ``nn.RMSNorm`` and eval-mode ``nn.BatchNorm1d/2d``.

All three compute :math:`y = \hat x \odot \gamma + \beta` with a normalised input
:math:`\hat x` that does not depend on :math:`\gamma, \beta`, so the per-sample gradients are
:math:`g^\gamma_{ir} = \sum_t \delta_{ir,t} \odot \hat x_{i,t}` and
:math:`g^\beta_{ir} = \sum_t \delta_{ir,t}` (t: every axis that is neither the sample axis nor
a feature axis). They are materialised as rows (m, R, P), P the number of affine entries:
:math:`K^{norm} = \sum_P g g^\top` is cheap because P is a layer width.

* LayerNorm: :math:`\hat x = (x - \mu)/\sqrt{\mathrm{var} + \epsilon}` over the
  ``normalized_shape`` trailing axes (``F.layer_norm`` without affine parameters).
* RMSNorm: :math:`\hat x = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` (``F.rms_norm``).
* BatchNorm in eval mode with running statistics:
  :math:`\hat x = (x - \text{running\_mean})/\sqrt{\text{running\_var} + \epsilon}` per channel
  (axis 1). In train mode every sample's output depends on the batch: not covered (the probe
  runs in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Piece, register


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if module.training or module.running_mean is None:
        return None
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.view(shape).to(x.dtype)
    var = module.running_var.view(shape).to(x.dtype)
    return (x - mean) / torch.sqrt(var + module.eps)


class NormRule:
    types = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return module.elementwise_affine
        return module.affine and module.track_running_stats

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        if x.dim() < 2:
            return None
        xhat = _normalised(module, x)
        if xhat is None:
            return None
        R, m = grad.shape[:2]
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            P = module.weight.numel()
            g = grad.reshape(R, m, -1, P)  # t axes, then the normalised features
            xh = xhat.reshape(1, m, -1, P)
            reduce = 2
        else:
            P = x.shape[1]
            g = grad.reshape(R, m, P, -1)
            xh = xhat.reshape(1, m, P, -1)
            reduce = 3
        parts = []
        if w:
            parts.append((g * xh).sum(reduce))
        if b:
            parts.append(g.sum(reduce))
        rows = torch.cat(parts, -1).transpose(0, 1).double()  # (m, R, P or 2P)
        return [Piece(rows=rows)]


register(NormRule())
