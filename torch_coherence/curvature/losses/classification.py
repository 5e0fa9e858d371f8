r"""The built-in losses: cross-entropy / NLL (classes and sequences), MSE, BCE with logits.

C = number of outputs per sample, p = softmax / sigmoid probabilities (docs/theory.md §3).

* ``nn.CrossEntropyLoss`` on logits (m, C) (class-index or probability targets):
  ``label_smoothing`` leaves :math:`\Lambda = \mathrm{diag}(p) - pp^\top` unchanged; class
  ``weight`` w with class-index targets scales sample i by
  :math:`s_i = m\, w_{y_i} / \sum_j w_{y_j}`, the factor PyTorch's weighted mean applies.
  Square root :math:`B = \mathrm{diag}(\sqrt p) - p \sqrt p^\top` (column c is
  :math:`\sqrt{p_c}(e_c - p)`). On (m, T, V) or (m, V, T) logits a sample is a sequence
  (:mod:`.sequence`).
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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import sequence
from .base import LossCurvature, OutputCurvature, flat, reduction


def _is_sequence(outputs: torch.Tensor) -> bool:
    return outputs.dim() >= 3


class SoftmaxCurvature(LossCurvature):
    """``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` (p = softmax(logits) or exp(log-probs))."""

    def check(self) -> None:
        reduction(self.loss)
        if self.loss.weight is not None and getattr(self.loss, "label_smoothing", 0.0) > 0:
            raise ValueError("loss: class weights together with label_smoothing are not supported")

    def _scale(self, targets: torch.Tensor, m: int) -> torch.Tensor | None:
        """Per-sample factor s_i of class-weighted means (None: all ones)."""
        loss = self.loss
        cls = targets.dim() == 1 and not targets.is_floating_point()
        if cls and (targets == loss.ignore_index).any():
            idx = torch.nonzero(targets == loss.ignore_index).flatten().tolist()
            raise ValueError(
                f"targets: samples {idx[:10]} have ignore_index; drop them from the probe"
            )
        if loss.weight is None or not cls:
            return None
        w = loss.weight.to(targets.device)[targets].double()
        if loss.reduction == "sum":
            return w
        return w * (m / w.sum())

    def _probs(self, out: torch.Tensor) -> torch.Tensor:
        return out.softmax(1) if isinstance(self.loss, nn.CrossEntropyLoss) else out.exp()

    def per_sample(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        if _is_sequence(outputs):
            return sequence.per_sample_losses(self.loss, outputs, targets)
        ls = sequence.unweighted_losses(self.loss, outputs, targets)
        scale = self._scale(targets, outputs.shape[0])
        return ls if scale is None else ls * scale.to(ls.dtype)

    def gradients(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        if _is_sequence(outputs):  # closed form: no float64 autograd pass over (m, T, V)
            return sequence.per_sample_gradients(self.loss, outputs, targets)
        return super().gradients(outputs, targets)

    def exact(self, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
        if _is_sequence(outputs):
            fac, _ = sequence.truncated_factor(self.loss, outputs, targets, 0.0, None)
            return OutputCurvature(fac)
        out = outputs.detach().double()
        if out.dim() != 2:
            raise ValueError(
                f"outputs: expected (m, C) or (m, T, V) for {type(self.loss).__name__}, "
                f"got {tuple(out.shape)}"
            )
        p = self._probs(out)
        sq = p.sqrt()
        B = torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)
        scale = self._scale(targets, out.shape[0])
        if scale is not None:
            B = B * scale.sqrt().view(-1, 1, 1)
        return OutputCurvature(B)

    def truncated(self, outputs: torch.Tensor, targets: Any, tol: float) -> OutputCurvature:
        if not _is_sequence(outputs) and targets.is_floating_point():
            return self.exact(outputs, targets)
        if _is_sequence(outputs):
            fac, bound = sequence.truncated_factor(self.loss, outputs, targets, tol)
            return OutputCurvature(fac, truncation=bound)
        scale = self._scale(targets, outputs.shape[0])  # also refuses ignore_index
        fac, bound = sequence.truncated_factor(
            self.loss, outputs.unsqueeze(1), targets.unsqueeze(1), tol
        )
        fac.out_shape = tuple(outputs.shape)
        if scale is not None:  # the batch-normalised class weights of the (m, C) case
            fac.omega = scale.view(-1, 1).to(fac.omega)
        return OutputCurvature(fac, truncation=bound)

    def sampled(
        self, outputs: torch.Tensor, targets: Any, samples: int, generator: torch.Generator
    ) -> OutputCurvature:
        r"""Sampled labels :math:`\hat y \sim p`, columns :math:`(p - e_{\hat y})/\sqrt S`.

        The gradient at a sampled label (Fisher sampling): :math:`E = \mathrm{diag}(p)-pp^\top`.
        Sequences: one column per draw summed over tokens (:mod:`.factor`).
        """
        if _is_sequence(outputs):
            return OutputCurvature(
                sequence.sampled_factor(self.loss, outputs, targets, samples, generator)
            )
        out = outputs.detach().double()
        m = out.shape[0]
        p = self._probs(out)
        C = p.shape[1]
        y = torch.multinomial(p.cpu(), samples, replacement=True, generator=generator)
        onehot = F.one_hot(y.to(p.device), C).double().transpose(1, 2)  # (m, C, S)
        B = (p.unsqueeze(2) - onehot) / samples**0.5
        scale = self._scale(targets, m)
        if scale is not None:
            B = B * scale.sqrt().view(m, 1, 1)
        return OutputCurvature(B)


class MSECurvature(LossCurvature):
    """``nn.MSELoss``: :math:`\\Lambda = (2/C) I` (mean) or 2 I (sum)."""

    def check(self) -> None:
        reduction(self.loss)

    def per_sample(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        el = (flat(outputs) - flat(targets.to(outputs.dtype))).square()
        return el.mean(1) if self.loss.reduction == "mean" else el.sum(1)

    def exact(self, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
        m = outputs.shape[0]
        C = flat(outputs).shape[1]
        c = 2.0 / C if self.loss.reduction == "mean" else 2.0
        eye = torch.eye(C, dtype=torch.float64, device=outputs.device)
        return OutputCurvature((eye * c**0.5).expand(m, C, C).clone())


class BCECurvature(LossCurvature):
    """``nn.BCEWithLogitsLoss``: :math:`\\Lambda = \\mathrm{diag}(p(1-p))/C` (mean)."""

    def check(self) -> None:
        reduction(self.loss)
        if self.loss.weight is not None or self.loss.pos_weight is not None:
            raise ValueError("loss: BCEWithLogitsLoss with weight/pos_weight is not supported")

    def per_sample(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        el = F.binary_cross_entropy_with_logits(
            flat(outputs), flat(targets.to(outputs.dtype)), reduction="none"
        )
        return el.mean(1) if self.loss.reduction == "mean" else el.sum(1)

    def exact(self, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
        f = flat(outputs.detach().double())
        p = torch.sigmoid(f)
        c = 1.0 / f.shape[1] if self.loss.reduction == "mean" else 1.0
        return OutputCurvature(torch.diag_embed((p * (1 - p) * c).sqrt()))
