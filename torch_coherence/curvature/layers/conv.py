r"""``nn.Conv1d`` / ``nn.Conv2d``: a = unfolded input patches, t = output position.

A convolution with g groups is g independent convolutions (input channels and output channels
split in g equal slices), so its Gram is the sum over groups of ghost Grams with
:math:`a^{(g)}` = the patches of the group's input channels and :math:`\delta^{(g)}` = the
group's output channels; depthwise convolutions are the case g = C_in. Padding of any kind
(numeric, ``'same'``, ``'valid'``) and mode (``'zeros'``, ``'circular'``, ``'reflect'``,
``'replicate'``) is applied to the input first, exactly as ``nn.Conv2d`` does through
``_reversed_padding_repeated_twice``; the patches are then taken without padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Piece, register


def unfold2d(x: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
    """``F.unfold`` without padding by strided slices (the CPU ``im2col`` kernel is slower).

    Returns (m, C k_h k_w, L) in ``F.unfold``'s order (channel-major, then kernel offsets).
    """
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [
        x[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    out = torch.stack(cols, 2)  # (m, C, kh kw, ho, wo)
    return out.reshape(x.shape[0], -1, ho * wo)


class ConvRule:
    types = (nn.Conv1d, nn.Conv2d)

    def supports(self, module: nn.Module) -> bool:
        return module.padding_mode in ("zeros", "circular", "reflect", "replicate")

    def pieces(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, w: bool, b: bool
    ) -> list[Piece] | None:
        nd = 1 if isinstance(module, nn.Conv1d) else 2
        if x.dim() != nd + 2:
            return None
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        xp = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        if nd == 1:
            xp = xp.unsqueeze(2)
            geom = ((1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0]))
        else:
            geom = (module.kernel_size, module.dilation, module.stride)
        R, m = grad.shape[:2]
        d_all = grad.reshape(R, m, module.out_channels, -1).permute(1, 0, 3, 2)  # (m, R, L, o)
        g = module.groups
        ci, co = module.in_channels // g, module.out_channels // g
        out = []
        for k in range(g):
            d = d_all[..., k * co : (k + 1) * co]
            if not w:
                out.append(Piece(a=x.new_ones((m, d.shape[2], 1)), d=d))
                continue
            cols = unfold2d(xp[:, k * ci : (k + 1) * ci], *geom)  # (m, k, L): a_t = cols[:, :, t]
            out.append(Piece(a=cols.transpose(1, 2), d=d, ones=b))
        return out


register(ConvRule())
