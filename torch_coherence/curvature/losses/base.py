"""What every supported loss provides to the engine, and the report of its output curvature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .factor import Factor


@dataclass(frozen=True)
class OutputCurvature:
    r"""Square roots of the output-space Hessians of a probe batch.

    Attributes:
        sqrt: (m, C, R) float64 B with :math:`B_i B_i^\top = \Lambda_i`: a tensor, or a
            :class:`.factor.LazyFactor` whose columns are built on demand (sequences).
        clipped: the most negative eigenvalue of any :math:`\Lambda_i` that was clipped to
            zero (0.0 when none; only callable losses can have one).
        truncation: bound on :math:`\max_t \|\Lambda_t - B_tB_t^\top\|_2 / \|\Lambda_t\|_2`
            of a truncated (top-k) factor (0.0 for exact factors; see :mod:`.sequence`).
    """

    sqrt: Factor
    clipped: float = 0.0
    truncation: float = 0.0


def flat(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.reshape(outputs.shape[0], -1)


def reduction(loss: nn.Module) -> str:
    red = getattr(loss, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError(
            f"loss: reduction={red!r} is not supported; use 'mean' (the training loss) or 'sum'"
        )
    return red


def as_double(targets: Any) -> Any:
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        return targets.double()
    return targets


class LossCurvature:
    """One supported loss: validation, per-sample losses and square roots of Lambda_i.

    Subclasses implement :meth:`check`, :meth:`per_sample` and :meth:`exact`; the defaults
    of :meth:`sampled` (Rademacher columns) and :meth:`truncated` (the exact factor) suit
    losses without a cheaper structure.
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def check(self) -> None:
        """Raise ``TypeError``/``ValueError`` for an unsupported configuration."""

    def per_sample(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """Per-sample losses l_i whose mean is the training loss (``reduction="mean"``)."""
        raise NotImplementedError

    def exact(self, outputs: torch.Tensor, targets: Any) -> OutputCurvature:
        """Exact square roots B_i of Lambda_i (detached float64)."""
        raise NotImplementedError

    def gradients(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """Per-sample dl_i/df_i (m, C) float64."""
        out = outputs.detach().double().requires_grad_(True)
        ls = self.per_sample(out, as_double(targets))
        (g,) = torch.autograd.grad(ls.sum(), out)
        return flat(g)

    def sampled(
        self, outputs: torch.Tensor, targets: Any, samples: int, generator: torch.Generator
    ) -> OutputCurvature:
        """Columns B_i Z / sqrt(S) with Rademacher Z (unbiased for Lambda_i)."""
        exact = self.exact(outputs, targets)
        sq = exact.sqrt
        if not isinstance(sq, torch.Tensor):
            sq = sq.dense()
        m, _, R = sq.shape
        z = torch.randint(0, 2, (m, R, samples), generator=generator).double() * 2 - 1
        return OutputCurvature(sq @ z.to(sq.device) / samples**0.5, exact.clipped)

    def truncated(self, outputs: torch.Tensor, targets: Any, tol: float) -> OutputCurvature:
        """A factor with :math:`\\|\\Lambda - BB^\\top\\| \\le` tol relative (default: exact)."""
        return self.exact(outputs, targets)
