r"""Sharpness-Aware Minimization (Foret et al., 2021) as a wrapper around any optimizer.

One SAM step at weights w with loss L:

1. ascent: e = rho * g / ||g|| with g = grad L(w) (adaptive SAM, Kwon et al. 2021:
   e = rho * T^2 g / ||T g|| with T = diag(|w|)), and move to w + e;
2. descent: compute g' = grad L(w + e), move back to w and let the base optimizer take
   its step with g'.

The base optimizer is built on the *same* ``param_groups`` list, so a learning-rate
scheduler or a probe that reads ``optimizer.param_groups`` sees one set of hyperparameters.
Paper 002 (Theorem C.8) analyses the linearisation of this update: its normaliser alpha is
the gradient norm ||g||; ``rho`` is read by :mod:`torch_coherence.probe` from the groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["SAM"]

_EPS = 1e-12


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimizer.

    Two ways to use it:

    * explicit steps (plain loops, Lightning manual optimization)::

          loss_fn(model(x), y).backward()
          opt.first_step(zero_grad=True)
          loss_fn(model(x), y).backward()
          opt.second_step(zero_grad=True)

    * a closure that zeroes the gradients, evaluates the loss and calls ``backward``
      (as for :class:`torch.optim.LBFGS`); :meth:`step` calls it twice, at w and at w + e.
      No gradient needs to exist beforehand, so this also works with Lightning's automatic
      optimization, which passes such a closure.

    Args:
        params: parameters or parameter groups, as for any optimizer. A group may set its
            own ``rho`` and ``adaptive``.
        base_optimizer: optimizer class (or any callable ``f(param_groups, **kwargs)``
            returning an optimizer), e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius (> 0).
        adaptive: use adaptive SAM (scale-invariant ascent step).
        **kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Raises:
        ValueError: ``rho`` is not a finite positive number.
        TypeError: ``base_optimizer`` does not produce a :class:`torch.optim.Optimizer`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < float("inf"):
            raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {type(adaptive).__name__}")
        if isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD (SAM builds "
                "it on its own param_groups), got an optimizer instance"
            )
        super().__init__(params, dict(rho=float(rho), adaptive=adaptive, **kwargs))
        base = base_optimizer(self.param_groups, **kwargs)
        if not isinstance(base, Optimizer):
            raise TypeError(
                f"base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}"
            )
        self.base_optimizer = base
        self._link()

    def _link(self) -> None:
        """Share one param_groups list (and defaults) with the base optimizer."""
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to w + e (the ascent step) using its current gradient.

        Args:
            zero_grad: clear the gradients afterwards, ready for the second backward pass.
        """
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale
                if group["adaptive"]:
                    e_w = e_w * p.square()
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Move back to w and take the base optimizer's step with the gradient at w + e.

        Args:
            zero_grad: clear the gradients afterwards.
        """
        for group in self.param_groups:
            for p in group["params"]:
                e_w = self.state[p].pop("e_w", None)
                if e_w is not None:
                    p.sub_(e_w)
        self.base_optimizer.step()
        # LR schedulers check this flag on the optimizer they were given (SAM, not its base).
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """A full SAM step driven by ``closure``.

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward`` and returns
                the loss. Required: SAM needs two gradient evaluations.

        Returns:
            The loss of the first closure call (at w).
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that re-evaluates the loss (or call first_step and "
                "second_step yourself)"
            )
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> float:
        """||g|| (adaptive: ||T g|| with T = diag(|w|)) over all parameters with a gradient."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad * p.abs() if group["adaptive"] else p.grad
                norms.append(torch.linalg.vector_norm(g.double()))
        if not norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the shared param groups (with ``rho``)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict produced by :meth:`state_dict` and relink the param groups."""
        self.base_optimizer.load_state_dict(state_dict)
        self._link()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
