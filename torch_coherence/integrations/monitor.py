"""Coherence monitoring for plain PyTorch training loops.

::

    monitor = CoherenceMonitor(model, nn.CrossEntropyLoss(), probe=train_set, writer=writer)
    monitor.start(opt, batch_size=32)  # the pre-flight probe, before the first step
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        monitor.step(opt, batch_size=x.shape[0], loss=loss)
        if monitor.should_stop:
            break

All the work is done by the shared :class:`~torch_coherence.probe.CoherenceProbe`; this
class only counts the caller's steps, passes the loss it already computed to the per-step
guard and writes to an optional ``SummaryWriter``
(:class:`~torch_coherence.integrations.tensorboard.TensorBoardLog`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..probe import CoherenceProbe, ProbeResult, effective_optimizer_params, shared_options
from .losses import as_engine_loss, missing_loss_message
from .tensorboard import TensorBoardLog

__all__ = ["CoherenceMonitor"]


class CoherenceMonitor:
    """Probe coherence, sharpness and stability margins every ``every_n_steps`` steps.

    Call :meth:`start` before the first optimizer step (and after loading a checkpoint):
    it runs the pre-flight probe. Call :meth:`step` after every optimizer step, with the
    loss the loop computed: a non-finite or jumping loss, or a changed learning rate,
    triggers a probe at once (the per-step guard of
    :meth:`~torch_coherence.probe.CoherenceProbe.observe`).

    Args:
        model: the network being trained.
        loss: the training loss: a loss module (``nn.CrossEntropyLoss()``), a
            ``torch.nn.functional`` loss (``F.cross_entropy``) or a per-sample callable.
        probe: ``(inputs, targets)`` tensors, a dataset or a data loader (see
            :class:`~torch_coherence.probe.CoherenceProbe`).
        dataset_size: n, the training-set size; default ``len(probe)`` for a dataset or
            loader (explicit tensors need it).
        writer: optional :class:`torch.utils.tensorboard.SummaryWriter`: scalars, the
            custom-scalars layout, warnings as text and (:meth:`log_figure`) the phase plane.
        every_n_steps, max_overhead, probe_size, on_unstable, margin_warning, lr_safety,
            sharpness, seed, mean_square_rate, lyapunov, criterion, act_on, max_triggered,
            lookahead, estimates, forward_fn, engine_kwargs: the probe's options
            (:data:`~torch_coherence.probe.SHARED_OPTIONS` and
            :data:`~torch_coherence.probe.EXTRA_OPTIONS`), documented and
            validated by :class:`~torch_coherence.probe.CoherenceProbe`; same defaults.

    Raises:
        ValueError: an invalid argument, named in the message.

    Attributes:
        should_stop: set when ``on_unstable="stop"`` and the verdict ``act_on`` names
            fired (default: the lookahead predicted a blow-up).
        probe: the shared probe object (history, last report, state).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Any,
        probe: Any,
        dataset_size: int | None = None,
        *,
        writer: Any = None,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.03,
        probe_size: int = 64,
        on_unstable: str = "warn",
        margin_warning: float | None = 0.8,
        lr_safety: float = 0.5,
        sharpness: str | None = None,
        seed: int = 0,
        mean_square_rate: bool = False,
        lyapunov: bool = True,
        criterion: str = "typical",
        act_on: str = "blowup",
        max_triggered: int = 10,
        lookahead: bool = True,
        estimates: str = "auto",
        forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss is None:
            raise ValueError(missing_loss_message("CoherenceMonitor", "loss is None"))
        loss = as_engine_loss(loss)
        if probe is None:
            raise ValueError("probe is required: (inputs, targets) tensors, a dataset or loader")
        if dataset_size is None:
            dataset = getattr(probe, "dataset", probe)
            if isinstance(probe, (tuple, list)) or not hasattr(dataset, "__len__"):
                raise ValueError("dataset_size is required when probe is given as tensors")
            dataset_size = len(dataset)
        self.model = model
        self.writer = writer
        self.should_stop = False
        self.probe = CoherenceProbe(
            loss=loss, probe=probe, dataset_size=dataset_size, **shared_options(locals())
        )
        self._tensorboard = None if writer is None else TensorBoardLog(writer)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per probe: the step, the metrics, ``lr``, ``batch_size``, warnings."""
        return self.probe.history

    def start(self, optimizer: torch.optim.Optimizer, batch_size: float) -> ProbeResult:
        """The pre-flight probe: call it before the first optimizer step and after a resume.

        It judges the current weights at the optimizer's learning rate and ``batch_size``
        before anything can blow up.

        Returns:
            The probe's result.
        """
        self.probe.start()
        return self.run(optimizer, batch_size)

    def step(
        self, optimizer: torch.optim.Optimizer, batch_size: float, loss: Any = None
    ) -> ProbeResult | None:
        """Count one optimizer step; probe, log, warn and act when a probe is due.

        Call it after ``optimizer.step()``.

        Args:
            optimizer: the optimizer (learning rate, momentum, weight decay, SAM's rho).
            batch_size: examples per optimizer step.
            loss: the training loss of this step as the loop computed it (a float or a
                0-d tensor; no extra forward pass), for the per-step guard; ``None``
                switches the guard's loss checks off.

        Returns:
            The probe's result when one ran, else ``None``.
        """
        self.probe.count_step()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        self.probe.observe(loss, effective_optimizer_params(optimizer)["lr"])
        if not self.probe.due():
            return None
        return self.run(optimizer, batch_size)

    def run(self, optimizer: torch.optim.Optimizer, batch_size: float) -> ProbeResult:
        """Probe now, whatever the schedule says."""
        result = self.probe.measure(self.model, optimizer, batch_size)
        try:
            self.probe.commit(result, optimizer)
        finally:
            self._log(result)
        self.should_stop = self.should_stop or result.stop
        return result

    def _log(self, result: ProbeResult) -> None:
        if self._tensorboard is not None:
            self._tensorboard.write_result(result)

    def log_figure(self) -> None:
        """Write the (B, eta) phase-plane figure of the history so far to the writer."""
        if self._tensorboard is not None:
            self._tensorboard.write_phase_plane(
                self.probe.history, self.probe.last_report, self.probe.steps
            )

    def state_dict(self) -> dict[str, Any]:
        """History, step count and warning state."""
        return {**self.probe.state_dict(), "should_stop": self.should_stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` so the curves continue after a resume."""
        self.probe.load_state_dict(state)
        self.should_stop = bool(state.get("should_stop", False))
