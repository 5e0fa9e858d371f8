r"""Output-space curvature of the training loss: per-sample losses, Lambda_i and its square root.

For a per-sample loss :math:`l(f_i, y_i)` the Gauss-Newton factor of sample i is
:math:`A_i = B_i^\top J_i` with :math:`B_i B_i^\top = \Lambda_i = \partial^2 l / \partial f^2`
(MATH.md §3). The per-sample loss is chosen so that the *mean* over samples is the training
loss with ``reduction="mean"``; then :math:`\frac1m \sum_i H_i` is the GGN of the training loss.

Supported losses (C = number of outputs per sample, p = softmax / sigmoid probabilities):

* ``nn.CrossEntropyLoss`` (logits (m, C); class-index or probability targets;
  ``label_smoothing`` leaves :math:`\Lambda = \mathrm{diag}(p) - pp^\top` unchanged;
  class ``weight`` w with class-index targets scales sample i by
  :math:`s_i = m\, w_{y_i} / \sum_j w_{y_j}`, the factor PyTorch's weighted mean applies).
  Square root :math:`B = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`.
* ``nn.NLLLoss`` on log-probabilities z: with :math:`p = e^z`, the same :math:`\Lambda` as
  cross-entropy. The loss is linear in z, but z = logits - logsumexp(logits) has Jacobian
  :math:`I - \mathbf 1 p^\top` and :math:`\Lambda \mathbf 1 = 0`, so
  :math:`J_z^\top \Lambda J_z = J^\top \Lambda J`: the GGN at the logits.
* ``nn.MSELoss``: mean over all m*C elements, so the per-sample loss is
  :math:`\frac1C \|f - y\|^2` and :math:`\Lambda = \frac2C I`.
* ``nn.BCEWithLogitsLoss`` (no ``weight``/``pos_weight``): per-sample loss is the mean over the
  C outputs, :math:`\Lambda = \frac1C \mathrm{diag}(p(1-p))`.
* ``reduction="sum"``: the per-sample loss is the sample's own sum-reduced loss (no 1/C),
  e.g. :math:`\|f-y\|^2` with :math:`\Lambda = 2I`; the sum-reduced training loss has Hessian
  :math:`\sum_i H_i = m \cdot \frac1m \sum_i H_i`. All reported sharpness values refer to the
  mean of the per-sample losses.
* a callable ``loss(output_i, target_i) -> scalar`` for one sample (no batch axis):
  :math:`\Lambda_i` by autodiff, factored by ``eigh``; negative eigenvalues (non-convex
  losses) are clipped to zero and the most negative one is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (
    "nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.BCEWithLogitsLoss (reduction 'mean' or "
    "'sum'), or a per-sample callable loss(output_i, target_i) -> scalar tensor (wrap it in a "
    "plain function, e.g. `lambda o, t: my_loss(o[None], t[None])`)"
)


@dataclass(frozen=True)
class OutputCurvature:
    r"""Square roots of the output-space Hessians of a probe batch.

    Attributes:
        sqrt: (m, C, R) float64 tensor B with :math:`B_i B_i^\top = \Lambda_i`.
        clipped: the most negative eigenvalue of any :math:`\Lambda_i` that was clipped to
            zero (0.0 when none; only callable losses can have one).
    """

    sqrt: torch.Tensor
    clipped: float = 0.0


def _reduction(loss: nn.Module) -> str:
    red = getattr(loss, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError(
            f"loss: reduction={red!r} is not supported; use 'mean' (the training loss) or 'sum'"
        )
    return red


def check_loss(loss: Any) -> None:
    """Raise ``TypeError``/``ValueError`` when ``loss`` is not supported."""
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        _reduction(loss)
        if loss.weight is not None and getattr(loss, "label_smoothing", 0.0) > 0:
            raise ValueError("loss: class weights together with label_smoothing are not supported")
        return
    if isinstance(loss, (nn.MSELoss,)):
        _reduction(loss)
        return
    if isinstance(loss, nn.BCEWithLogitsLoss):
        _reduction(loss)
        if loss.weight is not None or loss.pos_weight is not None:
            raise ValueError("loss: BCEWithLogitsLoss with weight/pos_weight is not supported")
        return
    if isinstance(loss, nn.Module) or not callable(loss):
        raise TypeError(f"loss: unsupported loss {type(loss).__name__}; supported: {SUPPORTED}")


def _flat(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.reshape(outputs.shape[0], -1)


def _class_scale(loss: nn.Module, targets: torch.Tensor, m: int) -> torch.Tensor | None:
    """Per-sample factor s_i of class-weighted / ignore_index means (None: all ones)."""
    cls = targets.dim() == 1 and not targets.is_floating_point()
    if cls and (targets == loss.ignore_index).any():
        idx = torch.nonzero(targets == loss.ignore_index).flatten().tolist()
        raise ValueError(f"targets: samples {idx[:10]} have ignore_index; drop them from the probe")
    if loss.weight is None or not cls:
        return None
    w = loss.weight.to(targets.device)[targets].double()
    if loss.reduction == "sum":
        return w
    return w * (m / w.sum())


def per_sample_losses(loss: Any, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-sample losses l_i whose mean is the training loss (mean reduction); see module doc."""
    m = outputs.shape[0]
    if isinstance(loss, nn.CrossEntropyLoss):
        ls = F.cross_entropy(
            outputs,
            targets,
            reduction="none",
            label_smoothing=loss.label_smoothing,
            ignore_index=loss.ignore_index,
        )
        scale = _class_scale(loss, targets, m)
        return ls if scale is None else ls * scale.to(ls.dtype)
    if isinstance(loss, nn.NLLLoss):
        ls = F.nll_loss(outputs, targets, reduction="none", ignore_index=loss.ignore_index)
        scale = _class_scale(loss, targets, m)
        return ls if scale is None else ls * scale.to(ls.dtype)
    if isinstance(loss, nn.MSELoss):
        d = _flat(outputs) - _flat(targets.to(outputs.dtype))
        el = d.square()
        return el.mean(1) if loss.reduction == "mean" else el.sum(1)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        el = F.binary_cross_entropy_with_logits(
            _flat(outputs), _flat(targets.to(outputs.dtype)), reduction="none"
        )
        return el.mean(1) if loss.reduction == "mean" else el.sum(1)
    return torch.func.vmap(loss)(outputs, targets)


def _softmax_sqrt(p: torch.Tensor) -> torch.Tensor:
    sq = p.sqrt()
    return torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)


def output_curvature(loss: Any, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
    """Exact square roots B_i (m, C, C) of Lambda_i at ``outputs`` (detached, float64)."""
    out = outputs.detach().double()
    m = out.shape[0]
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if out.dim() != 2:
            raise ValueError(
                f"outputs: expected (m, C) for {type(loss).__name__}, got {tuple(out.shape)}"
            )
        p = out.softmax(1) if isinstance(loss, nn.CrossEntropyLoss) else out.exp()
        B = _softmax_sqrt(p)
        scale = _class_scale(loss, targets, m)
        if scale is not None:
            B = B * scale.sqrt().view(m, 1, 1)
        return OutputCurvature(B)
    if isinstance(loss, nn.MSELoss):
        C = _flat(out).shape[1]
        c = 2.0 / C if loss.reduction == "mean" else 2.0
        eye = torch.eye(C, dtype=torch.float64, device=out.device)
        return OutputCurvature((eye * c**0.5).expand(m, C, C).clone())
    if isinstance(loss, nn.BCEWithLogitsLoss):
        f = _flat(out)
        p = torch.sigmoid(f)
        c = 1.0 / f.shape[1] if loss.reduction == "mean" else 1.0
        return OutputCurvature(torch.diag_embed((p * (1 - p) * c).sqrt()))
    # callable per-sample loss: Lambda_i by autodiff, eigh, clip negatives
    flat = _flat(out)
    shape = out.shape[1:]

    def lf(o: torch.Tensor, t: Any) -> torch.Tensor:
        return loss(o.reshape(shape), t)

    tg = (
        targets.double()
        if isinstance(targets, torch.Tensor) and targets.is_floating_point()
        else targets
    )
    lam = torch.func.vmap(torch.func.hessian(lf))(flat, tg)
    lam = 0.5 * (lam + lam.transpose(1, 2))
    if not torch.isfinite(lam).all():
        bad = (~torch.isfinite(lam)).flatten(1).any(1).nonzero().flatten().tolist()
        raise FloatingPointError(f"loss: non-finite output Hessian at samples {bad[:10]}")
    evals, evecs = torch.linalg.eigh(lam)
    clipped = float(evals.min().clamp(max=0.0))
    B = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)
    return OutputCurvature(B, clipped)


def output_gradients(loss: Any, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-sample dl_i/df_i, shape (m, C), float64 (for the per-sample gradient Gram)."""
    out = outputs.detach().double().requires_grad_(True)
    tg = (
        targets.double()
        if isinstance(targets, torch.Tensor) and targets.is_floating_point()
        else targets
    )
    ls = per_sample_losses(loss, out, tg)
    (g,) = torch.autograd.grad(ls.sum(), out)
    return _flat(g)


def sampled_curvature(
    loss: Any, outputs: torch.Tensor, targets: Any, samples: int, generator: torch.Generator
) -> OutputCurvature:
    r"""Monte-Carlo square roots (m, C, samples) with :math:`E[B B^\top] = \Lambda_i`.

    Cross-entropy / NLL: labels :math:`\hat y \sim p` and columns :math:`(p - e_{\hat y})/\sqrt S`
    (the gradient at a sampled label, Fisher sampling; :math:`E = \mathrm{diag}(p) - pp^\top`).
    Other losses: :math:`B_i Z / \sqrt S` with Rademacher Z (exact B_i from
    :func:`output_curvature`).
    """
    out = outputs.detach().double()
    m = out.shape[0]
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        p = out.softmax(1) if isinstance(loss, nn.CrossEntropyLoss) else out.exp()
        C = p.shape[1]
        y = torch.multinomial(p.cpu(), samples, replacement=True, generator=generator).to(p.device)
        onehot = F.one_hot(y, C).double().transpose(1, 2)  # (m, C, S)
        B = (p.unsqueeze(2) - onehot) / samples**0.5
        scale = _class_scale(loss, targets, m)
        if scale is not None:
            B = B * scale.sqrt().view(m, 1, 1)
        return OutputCurvature(B)
    exact = output_curvature(loss, outputs, targets)
    R = exact.sqrt.shape[2]
    z = torch.randint(0, 2, (m, R, samples), generator=generator).double().to(out.device) * 2 - 1
    return OutputCurvature(exact.sqrt @ z / samples**0.5, exact.clipped)


LossLike = nn.Module | Callable[..., torch.Tensor]
