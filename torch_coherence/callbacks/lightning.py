"""PyTorch Lightning callback: coherence, sharpness and stability margins during ``fit``.

::

    from torch_coherence.callbacks import CoherenceCallback

    trainer = pl.Trainer(callbacks=[CoherenceCallback()], logger=TensorBoardLogger("runs"))
    trainer.fit(model, train_loader)  # model.loss_fn (or model.criterion) is the loss

The class subclasses ``pytorch_lightning.Callback`` and uses only the hooks and Trainer
attributes that ``lightning.pytorch`` shares, so it works with either Trainer.

All measurement, reporting and hysteresis lives in the shared
:class:`~torch_coherence.probe.CoherenceProbe`; this module only reaches the optimizer, the
train dataloader, the loggers and the other ranks.

Distributed training: rank zero measures on the (identical) module replica and broadcasts
the small :class:`~torch_coherence.probe.ProbeResult`; every rank then commits it, so the
history, the hysteresis, ``should_stop`` and learning-rate changes agree across ranks, and
the metrics are logged once (``docs/overhead.md`` gives the measurement behind this
choice).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from ..probe import CoherenceProbe, CoherenceWarning, ProbeResult, shared_options
from ._tensorboard import MARGIN_LIMIT_TAG, add_layout, add_phase_plane, add_warnings, is_writer

__all__ = ["LOSS_ATTRIBUTES", "CoherenceCallback"]

#: LightningModule attributes searched, in order, for the loss when ``loss`` is not given.
LOSS_ATTRIBUTES = ("loss_fn", "criterion")

#: Assumed seconds of the first phase-plane figure, before one has been timed (measured:
#: 0.12 s on one CPU thread, 0.07 s building the figure and 0.05 s rendering it).
FIGURE_SECONDS = 0.1


class CoherenceCallback(pl.Callback):
    """Probe the Hessian coherence and the SGD/SAM stability margin during training.

    Every ``every_n_steps`` optimizer steps (counted with a hook on the optimizer, so manual
    optimization, gradient accumulation and SAM's two passes count correctly) it measures
    the probe batch, logs the metrics through every logger at the optimizer-step count and
    warns, with hysteresis, when the margin crosses ``margin_warning`` and 1 (mean-square
    divergence of the linearized dynamics).

    Args:
        every_n_steps, max_overhead, probe_size, on_unstable, margin_warning, lr_safety,
            sharpness, seed, mean_square_rate, lyapunov, criterion, forward_fn,
            engine_kwargs: the probe's
            options (:data:`~torch_coherence.probe.SHARED_OPTIONS`), documented and
            validated by :class:`~torch_coherence.probe.CoherenceProbe`; same defaults. In
            short: probe every ``every_n_steps`` optimizer steps, postponed so that probing
            (and the figures) take at most ``max_overhead`` of the training time, on
            ``probe_size`` examples drawn (seeded by ``seed``) from the training set;
            ``on_unstable="stop"`` sets ``trainer.should_stop`` on every rank.
        probe: explicit probe data instead: ``(inputs, targets)``, a dataset or a loader.
        loss: the training loss; default the LightningModule's ``loss_fn`` or ``criterion``
            attribute (:data:`LOSS_ATTRIBUTES`).
        dataset_size: n; default the length of the train dataloader's dataset.
        batch_size: examples per optimizer step; default the train dataloader's
            ``batch_size`` x ``accumulate_grad_batches`` x world size.
        log_figures: with a TensorBoard logger, write the (B, eta) phase plane at the end of
            an epoch in which a probe ran, when it fits in the ``max_overhead`` budget
            (figures and probes share it; with ``max_overhead=None`` always).

    Raises:
        ValueError: an invalid argument, named in the message.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.01,
        probe_size: int = 64,
        probe: Any = None,
        loss: Any = None,
        dataset_size: int | None = None,
        batch_size: int | None = None,
        on_unstable: str = "warn",
        margin_warning: float | None = 0.8,
        lr_safety: float = 0.5,
        log_figures: bool = True,
        sharpness: str | None = None,
        seed: int = 0,
        mean_square_rate: bool = False,
        lyapunov: bool = True,
        criterion: str = "typical",
        forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if not isinstance(log_figures, bool):
            raise ValueError(f"log_figures must be a bool, got {log_figures!r}")
        self.probe = CoherenceProbe(
            loss=loss, probe=probe, dataset_size=dataset_size, **shared_options(locals())
        )
        self.batch_size = batch_size
        self.log_figures = log_figures
        self._effective_batch: float | None = None
        self._layout_written = False
        self._figure_probes = 0
        self._figure_seconds = FIGURE_SECONDS

    # ------------------------------------------------------------------ setup
    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per probe (step, metrics, lr, batch size, warnings)."""
        return self.probe.history

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.probe.loss is None:
            for name in LOSS_ATTRIBUTES:
                if getattr(pl_module, name, None) is not None:
                    self.probe.loss = getattr(pl_module, name)
                    break
            else:
                raise ValueError(
                    "CoherenceCallback needs the training loss: pass loss= or give the "
                    f"LightningModule one of the attributes {LOSS_ATTRIBUTES}"
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loader = _train_loader(trainer)
        if not self.probe.has_probe:
            if loader is None:
                raise ValueError("CoherenceCallback: no train dataloader to draw a probe from")
            self.probe.set_probe(loader)
        if self.probe.dataset_size is None:
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError(
                    "CoherenceCallback: pass dataset_size= (the train dataset has no length)"
                )
            self.probe.dataset_size = len(dataset)
        per_device = self.batch_size or getattr(loader, "batch_size", None)
        if per_device is None:
            raise ValueError("CoherenceCallback: pass batch_size= (the loader has none)")
        if self.batch_size is None:
            per_device *= int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            per_device *= int(getattr(trainer, "world_size", 1) or 1)
        self._effective_batch = float(per_device)
        if not trainer.optimizers:
            raise ValueError("CoherenceCallback: the trainer has no optimizer")
        self.probe.attach(trainer.optimizers[0])
        if trainer.is_global_zero and not self._layout_written:
            for writer in _writers(trainer):
                add_layout(writer)
            self._layout_written = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.probe.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.probe.detach()

    # ------------------------------------------------------------------ probing
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.probe.due():
            self.run_probe(trainer, pl_module)

    def run_probe(self, trainer: Any, pl_module: Any) -> ProbeResult:
        """Probe now: rank zero measures, every rank commits the broadcast result."""
        optimizer = trainer.optimizers[0]
        assert self._effective_batch is not None, "on_train_start has not run"
        result: ProbeResult | None = None
        if trainer.is_global_zero:
            result = self.probe.measure(pl_module, optimizer, self._effective_batch)
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        assert result is not None

        def warn(message: str, category: type[Warning] = CoherenceWarning) -> None:
            if trainer.is_global_zero:
                rank_zero_warn(message, category=category)

        try:
            self.probe.commit(result, optimizer, warn=warn)
        finally:
            if trainer.is_global_zero:
                self._log(trainer, result)
        if result.stop:
            trainer.should_stop = True
        return result

    def _log(self, trainer: Any, result: ProbeResult) -> None:
        if result.metrics:
            for logger in trainer.loggers:
                logger.log_metrics(dict(result.metrics), step=result.step)
        for writer in _writers(trainer):
            if "stability/margin" in result.metrics:
                writer.add_scalar(MARGIN_LIMIT_TAG, 1.0, result.step)
            add_warnings(writer, result.messages, result.step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """The phase-plane figure, when a probe ran since the last one and the budget allows.

        A figure costs about 0.1 s (matplotlib), as much as several probes of a small
        model, so it shares the probes' ``max_overhead`` budget: it is drawn only when its
        (last, or first :data:`FIGURE_SECONDS`) cost fits, and its time is charged.
        """
        if not (self.log_figures and trainer.is_global_zero):
            return
        writers = _writers(trainer)
        probes = len(self.probe.history)
        if not writers or probes == self._figure_probes:
            return
        if not self.probe.affordable(self._figure_seconds * len(writers)):
            return
        start = time.perf_counter()
        for writer in writers:
            try:
                add_phase_plane(
                    writer, self.probe.history, self.probe.last_report, self.probe.steps
                )
            except Exception as err:  # a figure must never break training
                warnings.warn(f"torch-coherence: phase-plane figure failed: {err}", stacklevel=2)
        spent = time.perf_counter() - start
        self.probe.charge(spent)
        self._figure_seconds = spent / len(writers)
        self._figure_probes = probes

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """History, optimizer-step count and warning state (saved in checkpoints)."""
        return self.probe.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the curves and the schedule continue."""
        self.probe.load_state_dict(state_dict)


def _train_loader(trainer: Any) -> Any:
    loader = getattr(trainer, "train_dataloader", None)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


def _writers(trainer: Any) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers."""
    out = []
    for logger in trainer.loggers:
        if type(logger).__name__ != "TensorBoardLogger":
            continue
        writer = getattr(logger, "experiment", None)
        if writer is not None and is_writer(writer):
            out.append(writer)
    return out
