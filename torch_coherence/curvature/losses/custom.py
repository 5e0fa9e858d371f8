r"""A per-sample callable loss ``loss(output_i, target_i) -> scalar`` (no batch axis).

:math:`\Lambda_i` by autodiff, factored by ``eigh``; negative eigenvalues (non-convex losses)
are clipped to zero and the most negative one is reported.

Outputs of at most :data:`FULL_HESSIAN_MAX` numbers per sample get the whole C x C Hessian.
Larger outputs with a position axis (``output_i`` of shape (*pos, V), e.g. a per-sequence
loss on (T, V) logits) are never given the (T V)^2 Hessian: the loss is taken to be a sum
of per-position terms, whose Hessian is block diagonal, and the T blocks (V x V each) come
from V Hessian-vector products with :math:`v_c = \sum_t e_{t,c}` (column c of every block at
once). One more product with a random vector checks the block structure; a loss that couples
positions is refused with an error rather than measured wrongly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from .base import LossCurvature, OutputCurvature, as_double, flat
from .factor import TokenBlockFactor

#: Per-sample output size up to which the whole output Hessian is formed.
FULL_HESSIAN_MAX = 2048

#: Numbers per sample of the per-position blocks (T V^2) allowed.
BLOCKS_MAX = 1 << 24


class CallableCurvature(LossCurvature):
    """A plain function ``loss(output_i, target_i)`` vmapped over samples."""

    def check(self) -> None:
        if not callable(self.loss):
            raise TypeError(f"loss: {type(self.loss).__name__} is not callable")

    def per_sample(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return vmap(self.loss)(outputs, targets)

    def exact(self, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
        out = outputs.detach().double()
        tg = as_double(targets)
        if math.prod(out.shape[1:]) <= FULL_HESSIAN_MAX or out.dim() < 3:
            return self._full(out, tg)
        return self._blocks(out, tg)

    @staticmethod
    def _factor(lam: torch.Tensor) -> tuple[torch.Tensor, float]:
        lam = 0.5 * (lam + lam.transpose(-1, -2))
        if not torch.isfinite(lam).all():
            bad = (~torch.isfinite(lam)).flatten(1).any(1).nonzero().flatten().tolist()
            raise FloatingPointError(f"loss: non-finite output Hessian at samples {bad[:10]}")
        evals, evecs = torch.linalg.eigh(lam)
        clipped = float(evals.min().clamp(max=0.0))
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2), clipped

    def _full(self, out: torch.Tensor, tg: Any) -> OutputCurvature:
        shape = out.shape[1:]

        def lf(o: torch.Tensor, t: Any) -> torch.Tensor:
            return self.loss(o.reshape(shape), t)

        lam = vmap(torch.func.hessian(lf))(flat(out), tg)
        B, clipped = self._factor(lam)
        return OutputCurvature(B, clipped)

    def _blocks(self, out: torch.Tensor, tg: Any) -> OutputCurvature:
        m, V = out.shape[0], out.shape[-1]
        T = math.prod(out.shape[1:-1])
        if T * V * V > BLOCKS_MAX:
            raise ValueError(
                f"loss: a callable loss on outputs of shape {tuple(out.shape[1:])} needs {T} "
                f"output-Hessian blocks of {V} x {V} per sample ({T * V * V} numbers, more "
                f"than {BLOCKS_MAX}); use nn.CrossEntropyLoss / nn.NLLLoss, whose "
                "structure the engine uses, or a smaller output"
            )
        shape = out.shape[1:]
        gfn = grad(lambda o, t: self.loss(o.reshape(shape), t))

        def hvp(o: torch.Tensor, t: Any, v: torch.Tensor) -> torch.Tensor:
            return jvp(lambda x: gfn(x, t), (o,), (v,))[1]

        o2 = out.reshape(m, T, V)
        eye = torch.eye(V, dtype=out.dtype, device=out.device)
        probes = eye.unsqueeze(1).expand(V, T, V)  # v_c = sum_t e_{t,c}
        cols = vmap(lambda o, t: vmap(lambda v: hvp(o, t, v))(probes))(o2, tg)  # (m, V, T, V)
        blocks = cols.permute(0, 2, 3, 1)  # (m, T, V, V): [t, c', c]
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(m, T, V, generator=gen, dtype=out.dtype).to(out.device)
        direct = vmap(hvp)(o2, tg, v)
        pred = torch.einsum("mtab,mtb->mta", blocks, v)
        err = (direct - pred).flatten(1).norm(dim=1) / direct.flatten(1).norm(dim=1).clamp_min(
            1e-300
        )
        if (err > 1e-6).any():
            idx = (err > 1e-6).nonzero().flatten().tolist()
            raise ValueError(
                f"loss: the callable loss couples positions of its {tuple(shape)} output "
                f"(samples {idx[:10]}: block-diagonal Hessian off by {float(err.max()):.2g}); "
                f"only per-position sums are supported above {FULL_HESSIAN_MAX} outputs a sample"
            )
        B, clipped = self._factor(blocks)
        return OutputCurvature(TokenBlockFactor(B, tuple(out.shape), True), clipped)
