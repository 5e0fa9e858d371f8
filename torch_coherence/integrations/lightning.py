"""PyTorch Lightning callback: coherence, sharpness and stability margins during ``fit``.

::

    from torch_coherence.callbacks import CoherenceCallback

    trainer = pl.Trainer(callbacks=[CoherenceCallback()], logger=TensorBoardLogger("runs"))
    trainer.fit(model, train_loader)  # model.loss_fn (or model.criterion) is the loss

The class subclasses ``pytorch_lightning.Callback`` and uses only the hooks and Trainer
attributes that ``lightning.pytorch`` shares, so it works with either Trainer
(``lightning.pytorch.Trainer(callbacks=[CoherenceCallback()])``; both are tested).

All measurement, reporting and hysteresis lives in the shared
:class:`~torch_coherence.probe.CoherenceProbe`; this module only reaches the optimizers, the
train dataloader, the loggers and the other ranks.

When it probes:

* before the first optimizer step of a fit, and again after a resume (the pre-flight probe,
  :meth:`CoherenceProbe.start`): are these weights stable at this lr and batch size?
* every ``every_n_steps`` optimizer steps, within the ``max_overhead`` time budget;
* at once when the per-step guard (:meth:`CoherenceProbe.observe`) fires on the training
  loss ``training_step`` returned and the optimizers' largest learning rate.

Distributed training: rank zero measures on the (identical) module replica and broadcasts
the small :class:`~torch_coherence.probe.ProbeResult`; every rank then commits it, so the
history, the hysteresis, ``should_stop`` and learning-rate changes agree across ranks, and
the metrics are logged once (``docs/overhead.md`` gives the measurement behind this
choice).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from ..probe import (
    CoherenceProbe,
    CoherenceWarning,
    ProbeResult,
    effective_optimizer_params,
    shared_options,
)
from .losses import as_engine_loss, missing_loss_message
from .tensorboard import TensorBoardLog, is_writer

__all__ = ["LOSS_ATTRIBUTES", "CoherenceCallback"]

#: LightningModule attributes searched, in order, for the loss when ``loss`` is not given.
LOSS_ATTRIBUTES = ("loss_fn", "criterion")

#: Assumed seconds of the first phase-plane figure, before one has been timed (measured:
#: 0.12 s on one CPU thread, 0.07 s building the figure and 0.05 s rendering it).
FIGURE_SECONDS = 0.1


class CoherenceCallback(pl.Callback):
    """Probe the Hessian coherence and the SGD/SAM stability margin during training.

    A pre-flight probe runs before the first optimizer step (and after a resume); then every
    ``every_n_steps`` optimizer steps (counted with a hook on the optimizer, so manual
    optimization, gradient accumulation and SAM's two passes count correctly), and at once
    when the per-step guard fires on the training loss. Each probe logs the metrics through
    every logger at the optimizer-step count and warns, with hysteresis.

    All options are keyword-only, in :class:`~torch_coherence.CoherenceMonitor`'s order.

    Args:
        loss: the training loss: a loss module (``torch.nn.CrossEntropyLoss()``), a
            ``torch.nn.functional`` loss (``F.cross_entropy``) or a per-sample callable;
            default the LightningModule's ``loss_fn`` or ``criterion`` attribute
            (:data:`LOSS_ATTRIBUTES`), checked in ``setup``.
        probe: explicit probe data instead of a draw from the train dataloader's dataset:
            ``(inputs, targets)``, a dataset or a loader.
        dataset_size: n; default the length of the train dataloader's dataset.
        batch_size: examples per optimizer step; default the train dataloader's
            ``batch_size`` x ``accumulate_grad_batches`` x world size.
        every_n_steps, max_overhead, probe_size, on_unstable, margin_warning, lr_safety,
            sharpness, seed, mean_square_rate, lyapunov, criterion, act_on, max_triggered,
            lookahead, estimates, forward_fn, engine_kwargs: the probe's options
            (:data:`~torch_coherence.probe.SHARED_OPTIONS` and
            :data:`~torch_coherence.probe.EXTRA_OPTIONS`), documented and validated by
            :class:`~torch_coherence.probe.CoherenceProbe`; same defaults.
            ``on_unstable="stop"`` sets ``trainer.should_stop`` on every rank.
        log_figures: with a TensorBoard logger, write the (B, eta) phase plane at the end of
            an epoch in which a probe ran, when it fits in the ``max_overhead`` budget
            (figures and probes share it; with ``max_overhead=None`` always).

    With several optimizers the largest learning rate over all their param groups is the
    one judged (the most unstable direction decides), with that group's momentum.

    Raises:
        ValueError: an invalid argument, named in the message.
    """

    def __init__(
        self,
        *,
        loss: Any = None,
        probe: Any = None,
        dataset_size: int | None = None,
        batch_size: int | None = None,
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
        log_figures: bool = True,
    ) -> None:
        super().__init__()
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if not isinstance(log_figures, bool):
            raise ValueError(f"log_figures must be a bool, got {log_figures!r}")
        if loss is not None:
            loss = as_engine_loss(loss)
        self.probe = CoherenceProbe(
            loss=loss, probe=probe, dataset_size=dataset_size, **shared_options(locals())
        )
        self.batch_size = batch_size
        self.log_figures = log_figures
        self._effective_batch: float | None = None
        self._observed_steps = 0
        self._tensorboard: dict[int, TensorBoardLog] = {}
        self._figure_probes = 0
        self._figure_seconds = FIGURE_SECONDS

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key from the options, so that two callbacks do not collide."""
        p = self.probe
        return self._generate_state_key(
            every_n_steps=p.every_n_steps,
            probe_size=p.probe_size,
            seed=p.seed,
            criterion=p.criterion,
            on_unstable=p.on_unstable,
            max_overhead=p.max_overhead,
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per probe (step, metrics, lr, batch size, warnings)."""
        return self.probe.history

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the configuration before anything runs: the loss must be known."""
        if stage != "fit":
            return
        if self.probe.loss is None:
            for name in LOSS_ATTRIBUTES:
                found = getattr(pl_module, name, None)
                if found is not None:
                    self.probe.loss = as_engine_loss(found, owner=f"{name} attribute")
                    break
            else:
                where = f"{type(pl_module).__name__} has none of the attributes {LOSS_ATTRIBUTES}"
                raise ValueError(missing_loss_message("CoherenceCallback", where))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe data, n, B, the step hook, the layout; then the pre-flight probe."""
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
        if trainer.is_global_zero:
            for log in self._tensorboard_logs(trainer):
                log.write_layout()
        self._observed_steps = self.probe.steps
        self.probe.start()
        self.run_probe(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.probe.detach()

    # ------------------------------------------------------------------ probing
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After an optimizer step: the per-step guard, then a probe when one is due."""
        if trainer.sanity_checking:
            return
        if self.probe.steps > self._observed_steps:
            self._observed_steps = self.probe.steps
            lr = effective_optimizer_params(optimizers_as_one(trainer.optimizers))["lr"]
            self.probe.observe(_loss_value(outputs), lr)
        if self.probe.due():
            self.run_probe(trainer, pl_module)

    def run_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeResult:
        """Probe now: rank zero measures, every rank commits the broadcast result."""
        optimizer = optimizers_as_one(trainer.optimizers)
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
            self.probe.commit(result, optimizer, warn)
        finally:
            if trainer.is_global_zero:
                self._log(trainer, result)
        if result.stop:
            trainer.should_stop = True
        return result

    def _log(self, trainer: pl.Trainer, result: ProbeResult) -> None:
        """TensorBoard loggers get the readable, described tags; the others the metrics."""
        tensorboard = _tensorboard_loggers(trainer)
        if result.metrics:
            for logger in trainer.loggers:
                if logger not in tensorboard:
                    logger.log_metrics(dict(result.metrics), step=result.step)
        for log in self._tensorboard_logs(trainer):
            log.write_result(result)

    def _tensorboard_logs(self, trainer: pl.Trainer) -> list[TensorBoardLog]:
        logs = []
        for logger in _tensorboard_loggers(trainer):
            writer = getattr(logger, "experiment", None)
            if writer is None or not is_writer(writer):
                continue
            log = self._tensorboard.get(id(writer))
            if log is None or log.writer is not writer:
                log = self._tensorboard[id(writer)] = TensorBoardLog(writer)
            logs.append(log)
        return logs

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The phase-plane figure, when a probe ran since the last one and the budget allows.

        A figure costs about 0.1 s (matplotlib), as much as several probes of a small
        model, so it shares the probes' ``max_overhead`` budget: it is drawn only when its
        (last, or first :data:`FIGURE_SECONDS`) cost fits, and its time is charged.
        """
        if not (self.log_figures and trainer.is_global_zero):
            return
        logs = self._tensorboard_logs(trainer)
        probes = len(self.probe.history)
        if not logs or probes == self._figure_probes:
            return
        if not self.probe.affordable(self._figure_seconds * len(logs)):
            return
        start = time.perf_counter()
        for log in logs:
            try:
                log.write_phase_plane(self.probe.history, self.probe.last_report, self.probe.steps)
            except Exception as err:  # a figure must never break training
                warnings.warn(f"torch-coherence: phase-plane figure failed: {err}", stacklevel=2)
        spent = time.perf_counter() - start
        self.probe.charge(spent)
        self._figure_seconds = spent / len(logs)
        self._figure_probes = probes

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """History, optimizer-step count and warning state (saved in checkpoints)."""
        return self.probe.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the curves and the schedule continue."""
        self.probe.load_state_dict(state_dict)


class _Optimizers:
    """Several optimizers seen as one: every param group, the largest learning rate decides.

    ``effective_optimizer_params`` and ``set_learning_rate`` read and scale
    :attr:`param_groups` (the optimizers' own group dicts); any other attribute (SAM's
    ``base_optimizer``) is that of the optimizer holding the largest learning rate.
    """

    def __init__(self, optimizers: list[Any]) -> None:
        self.optimizers = [getattr(o, "_optimizer", o) for o in optimizers]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def _top(self) -> Any:
        def largest(o: Any) -> float:
            return max((float(g.get("lr", -math.inf)) for g in o.param_groups), default=-1.0)

        return max(self.optimizers, key=largest)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizers":
            raise AttributeError(name)
        return getattr(self._top(), name)


def optimizers_as_one(optimizers: list[Any]) -> Any:
    """The only optimizer, or all of them as one (:class:`_Optimizers`)."""
    if len(optimizers) == 1:
        return optimizers[0]
    return _Optimizers(list(optimizers))


def _loss_value(outputs: Any) -> Any:
    """The training loss ``training_step`` returned (a tensor, or a dict's ``"loss"``)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    return None


def _train_loader(trainer: pl.Trainer) -> Any:
    loader = getattr(trainer, "train_dataloader", None)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


def _tensorboard_logger_classes() -> tuple[type, ...]:
    """``pytorch_lightning``'s TensorBoardLogger, and ``lightning.pytorch``'s when loaded."""
    classes: list[type] = [TensorBoardLogger]
    unified = sys.modules.get("lightning.pytorch.loggers")
    if unified is not None and hasattr(unified, "TensorBoardLogger"):
        classes.append(unified.TensorBoardLogger)
    return tuple(classes)


def _tensorboard_loggers(trainer: pl.Trainer) -> list[Any]:
    classes = _tensorboard_logger_classes()
    return [logger for logger in trainer.loggers if isinstance(logger, classes)]
