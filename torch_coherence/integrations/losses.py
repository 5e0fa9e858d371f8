"""The training loss as the curvature engine takes it, from what a user's code holds.

Training code often computes the loss with a function (``F.cross_entropy(logits, y)``)
rather than a module attribute. The engine's closed-form output Hessians need the module
(:mod:`torch_coherence.curvature.losses`), so the functional losses below are replaced by
their module with default options (``reduction="mean"``, the functions' default too).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from ..curvature.losses import SUPPORTED, check_loss

__all__ = ["FUNCTIONAL_LOSSES", "accepted_losses", "as_engine_loss", "missing_loss_message"]

#: Loss functions accepted in place of their module.
FUNCTIONAL_LOSSES: dict[Any, type[nn.Module]] = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.nll_loss: nn.NLLLoss,
    F.mse_loss: nn.MSELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}


def accepted_losses() -> str:
    """The kinds of ``loss=`` every integration accepts, as one sentence."""
    names = ", ".join(f"F.{f.__name__}" for f in FUNCTIONAL_LOSSES)
    return f"{SUPPORTED}; or one of the functions {names} (torch.nn.functional)"


def as_engine_loss(loss: Any, owner: str = "loss") -> Any:
    """``loss`` as the engine takes it: a supported module or a per-sample callable.

    Args:
        loss: a loss module, one of :data:`FUNCTIONAL_LOSSES`, or a per-sample callable
            ``loss(output_i, target_i) -> scalar``.
        owner: how the argument is named in error messages.

    Raises:
        ValueError: ``loss`` is not one of the accepted kinds (the message lists them).
    """
    module = FUNCTIONAL_LOSSES.get(loss)
    if module is not None:
        return module()
    try:
        check_loss(loss)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: {err}. Accepted: {accepted_losses()}") from None
    return loss


def missing_loss_message(integration: str, where: str) -> str:
    """The error text when no loss was given or found: the call to write and the kinds."""
    return (
        f"{integration} needs the training loss: {where}. Pass it, e.g. "
        f"{integration}(loss=torch.nn.CrossEntropyLoss()). Accepted: {accepted_losses()}"
    )
