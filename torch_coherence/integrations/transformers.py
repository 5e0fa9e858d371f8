"""Hugging Face ``transformers.Trainer`` callback (``pip install "torch-coherence[hf]"``).

::

    from torch_coherence.callbacks import CoherenceTrainerCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]),
                      train_dataset=train_set, callbacks=[CoherenceTrainerCallback()])
    trainer.train()

The probe batch is drawn (seeded) from the Trainer's train dataset and collated by its data
collator; the samples' ``labels`` are the targets and the other tensors the inputs of
``model(**inputs).logits``. The loss is inferred from the model:

* a causal language model (``...ForCausalLM``, ``GPT2LMHeadModel``): the shifted-token
  cross-entropy of each sequence, averaged over its predicted tokens (labels ``-100``
  ignored) — :func:`causal_lm_loss`;
* a sequence classifier, by ``config.problem_type`` as the model computes its own loss:
  ``"single_label_classification"`` -> cross-entropy, ``"multi_label_classification"`` ->
  ``BCEWithLogitsLoss``, ``"regression"`` -> ``MSELoss`` (unset: regression when
  ``num_labels == 1``, else by the labels' dtype, as the model does);

or given with ``loss=``. Metrics go through the Trainer's own logging (``Trainer.log``), so
they are in ``trainer.state.log_history`` and reach every ``report_to`` integration under the
probe's tags (TensorBoard, which prefixes ``train/``, gets each tag's description and the
custom-scalars layout, see :mod:`torch_coherence.integrations.tensorboard`). ``on_unstable
="stop"`` sets ``control.should_training_stop``.

When it probes: a pre-flight probe in ``on_train_begin`` (before the first optimizer step,
and after a resume, once the checkpoint's weights are loaded); then after optimizer steps
(``on_step_end``) on the schedule and when the per-step guard fires on the training loss
the model returned (captured by a forward hook, no extra forward pass) and the largest lr.

Multi-process runs (``accelerate launch`` / ``torchrun``): rank zero measures and
broadcasts the result, every rank commits it, as the Lightning callback does under DDP.

Limits: the causal-LM loss is a per-sample callable, whose output Hessian the engine forms
by autodiff on the T x V logits of a sequence: fine for small vocabularies and sequences
(the tests), out of reach for a real vocabulary until the engine takes the per-sequence
cross-entropy on (m, T, V) logits in closed form. The probe's inputs carry explicit
position ids and a 4-D attention mask (:func:`draw_probe`), which models that build their
own masks differently may not accept; then pass ``probe=`` and ``forward_fn=``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from ..probe import (
    CoherenceProbe,
    CoherenceWarning,
    ProbeResult,
    effective_optimizer_params,
    shared_options,
)
from .losses import as_engine_loss, missing_loss_message
from .tensorboard import (
    NOTES_TAG,
    WARNINGS_TAG,
    DescribedWriter,
    NonFiniteNotes,
    TensorBoardLog,
    readable_metrics,
)

__all__ = [
    "CoherenceTrainerCallback",
    "causal_lm_loss",
    "draw_probe",
    "infer_loss",
    "is_causal_lm",
    "logits_forward",
]

#: The prefix HF's TensorBoardCallback puts before training logs.
TENSORBOARD_PREFIX = "train/"


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted-token cross-entropy of one sequence (logits (T, V), labels (T,)).

    The mean over the predicted positions t of ``-log softmax(logits[t])[labels[t + 1]]``,
    positions whose label is -100 left out: a causal LM's own loss for one sequence (the
    Trainer's batch loss averages over all tokens of the batch; equal for sequences without
    padding).
    """
    pred, target = logits[:-1], labels[1:]
    keep = (target != -100).to(pred.dtype)
    ce = F.cross_entropy(pred, target.clamp_min(0), reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


def logits_forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**inputs).logits``: the forward pass the probe differentiates."""
    return model(**inputs).logits


def _class_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, mapping_name, {}).values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def infer_loss(model: nn.Module, targets: torch.Tensor) -> Any:
    """The loss the model computes for itself, as the engine takes it (see module doc).

    Raises:
        ValueError: the model is neither a causal LM nor a sequence classifier.
    """
    name = type(model).__name__
    if is_causal_lm(model):
        return causal_lm_loss
    if name.endswith("ForSequenceClassification") or name in _class_names(
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    ):
        config = model.config
        kind = getattr(config, "problem_type", None)
        if kind is None:
            if config.num_labels == 1:
                kind = "regression"
            elif targets.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        losses = {
            "regression": nn.MSELoss,
            "single_label_classification": nn.CrossEntropyLoss,
            "multi_label_classification": nn.BCEWithLogitsLoss,
        }
        if kind in losses:
            return losses[kind]()
    where = f"the loss of a {name} (config.problem_type) cannot be inferred"
    raise ValueError(missing_loss_message("CoherenceTrainerCallback", where))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model is a causal language model (by its class, as ``AutoModel`` maps)."""
    name = type(model).__name__
    return name in _class_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") or name.endswith("ForCausalLM")


def draw_probe(
    dataset: Any, collate: Callable[[list[Any]], Any], size: int, seed: int, model: nn.Module
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``size`` samples (seeded, without replacement), collated; inputs and ``labels``.

    Two inputs are made explicit so that per-sample Jacobians (``torch.func.vmap``) go
    through the model: ``position_ids`` (the positions the model uses by default,
    0..T-1, with the batch axis every input needs) when the model takes them, and the
    attention mask as the 4-D additive mask the model would build (causal for a causal
    LM, key padding from the collated ``attention_mask``): HF models use a 4-D mask as
    given, skipping the data-dependent mask code that ``vmap`` rejects.
    """
    n = len(dataset)
    if n < 1:
        raise ValueError("CoherenceTrainerCallback: the train dataset is empty")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(size, n)].sort().values
    batch = dict(collate([dataset[int(i)] for i in idx]))
    if "labels" not in batch:
        raise ValueError(
            "CoherenceTrainerCallback: the collated train samples have no 'labels' "
            f"(keys {sorted(batch)}); pass probe=(inputs, targets)"
        )
    targets = batch.pop("labels")
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2:
        return inputs, targets
    m, T = ids.shape
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params and "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(T).repeat(m, 1)
    keys = inputs.get("attention_mask", torch.ones(m, T)).bool()
    allowed = keys[:, None, None, :].expand(m, 1, T, T)
    if is_causal_lm(model):
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(m, 1, T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    inputs["attention_mask"] = mask
    return inputs, targets


class CoherenceTrainerCallback(TrainerCallback):
    """Probe coherence, sharpness and stability margins inside ``transformers.Trainer``.

    All options are keyword-only, in :class:`~torch_coherence.CoherenceMonitor`'s order.

    Args:
        loss: the training loss (module, ``torch.nn.functional`` loss or per-sample
            callable); default inferred from the model (module doc, :func:`infer_loss`).
        probe: explicit ``(inputs, targets)`` instead of a draw from the train dataset
            (inputs: a dict of tensors for ``forward_fn``).
        dataset_size: n; default the length of the Trainer's train dataset.
        batch_size: examples per optimizer step; default ``per_device_train_batch_size`` x
            ``gradient_accumulation_steps`` x world size.
        every_n_steps, max_overhead, probe_size, on_unstable, margin_warning, lr_safety,
            sharpness, seed, mean_square_rate, lyapunov, criterion, act_on, max_triggered,
            lookahead, estimates, forward_fn, engine_kwargs: the probe's options
            (:data:`~torch_coherence.probe.SHARED_OPTIONS` and
            :data:`~torch_coherence.probe.EXTRA_OPTIONS`), documented and validated by
            :class:`~torch_coherence.probe.CoherenceProbe`; same defaults, except
            ``forward_fn``: default :func:`logits_forward`.

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
    ) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if loss is not None:
            loss = as_engine_loss(loss)
        options = shared_options(locals())
        options["forward_fn"] = forward_fn or logits_forward
        self.probe = CoherenceProbe(loss=loss, probe=probe, dataset_size=dataset_size, **options)
        self.batch_size = batch_size
        self._effective_batch: float | None = None
        self._trainer: Trainer | None = None
        self._hook: Any = None
        self._hooked: nn.Module | None = None
        self._losses: list[torch.Tensor] = []
        self._tensorboard: list[TensorBoardLog] = []
        self._notes = NonFiniteNotes()

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per probe (step, metrics, lr, batch size, warnings)."""
        return self.probe.history

    # ------------------------------------------------------------------ setup
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Probe data, loss, n, B, TensorBoard, loss hook; then the pre-flight probe."""
        trainer = _calling_trainer()
        self._trainer = trainer
        model = _first(kwargs.get("model"), trainer.model)
        loader = kwargs.get("train_dataloader")
        dataset = _first(getattr(loader, "dataset", None), trainer.train_dataset)
        if not self.probe.has_probe:
            collate = _first(getattr(loader, "collate_fn", None), trainer.data_collator)
            self.probe.set_probe(
                draw_probe(dataset, collate, self.probe.probe_size, self.probe.seed, model)
            )
        if self.probe.loss is None:
            self.probe.loss = infer_loss(model, self.probe.probe_batch[1])
        if self.probe.dataset_size is None:
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError("CoherenceTrainerCallback: pass dataset_size= (no dataset length)")
            self.probe.dataset_size = len(dataset)
        per_step = self.batch_size or (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        self._effective_batch = float(per_step)
        self._tensorboard = _described_tensorboard(trainer) if state.is_world_process_zero else []
        for log in self._tensorboard:
            log.write_layout()
        self._remove_hook()
        self._hook_on(model)
        self._losses = []
        self.probe.steps = int(state.global_step)
        self.probe.start()
        optimizer = _unwrap(kwargs.get("optimizer"))
        self.run_probe(args, state, control, optimizer, kwargs.get("lr_scheduler"))
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._remove_hook()
        self._hooked = None
        return control

    def _hook_on(self, model: nn.Module | None) -> None:
        self._hooked = model
        if model is not None:
            self._hook = model.register_forward_hook(self._record_loss)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _measure(self, model: nn.Module, optimizer: Any) -> ProbeResult:
        """The probe's measurement with the loss hook detached.

        The lookahead deep-copies the model, forward hooks included: this hook is bound to
        the callback, which holds the Trainer (and its locks, which cannot be copied), and a
        copy of it would record the lookahead's losses as training losses.
        """
        hooked = self._hooked
        self._remove_hook()
        try:
            return self.probe.measure(model, optimizer, self._effective_batch)
        finally:
            self._hook_on(hooked)

    def _record_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: keep the training loss the model returned (detached)."""
        if not module.training:
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())

    # ------------------------------------------------------------------ probing
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """After an optimizer step: count it, the per-step guard, a probe when due."""
        self.probe.count_step()
        self.probe.steps = int(state.global_step)
        losses, self._losses = self._losses, []
        loss = torch.stack(losses).float().mean() if losses else None
        optimizer = _unwrap(kwargs.get("optimizer"))
        if optimizer is not None:
            self.probe.observe(loss, effective_optimizer_params(optimizer)["lr"])
        if self.probe.due():
            self.run_probe(args, state, control, optimizer, kwargs.get("lr_scheduler"))
        return control

    def run_probe(
        self, args: Any, state: Any, control: Any, optimizer: Any, lr_scheduler: Any = None
    ) -> ProbeResult:
        """Probe now: rank zero measures, every rank commits the broadcast result."""
        assert self._trainer is not None and self._effective_batch is not None
        if optimizer is None:
            optimizer = _unwrap(self._trainer.optimizer)
        model = self._trainer.model
        result = None
        if state.is_world_process_zero:
            result = self._measure(model, optimizer)
        result = _broadcast(result, args.world_size)
        old_lr = effective_optimizer_params(optimizer)["lr"]

        def warn(message: str, category: type[Warning] = CoherenceWarning) -> None:
            if state.is_world_process_zero:
                warnings.warn(message, category, stacklevel=2)

        try:
            self.probe.commit(result, optimizer, warn)
        finally:
            self._log(result)
        if result.new_lr is not None and old_lr > 0:
            _scale_scheduler(lr_scheduler, result.new_lr / old_lr)
        if result.stop:
            control.should_training_stop = True
        return result

    def _log(self, result: ProbeResult) -> None:
        """Through ``Trainer.log``: finite scalars, notes on infinite ones, warnings."""
        assert self._trainer is not None
        scalars, non_finite = readable_metrics(result.metrics, result.report)
        logs: dict[str, Any] = dict(scalars)
        notes = self._notes(non_finite, result.step)
        if notes:
            logs[NOTES_TAG] = "\n".join(notes)
        if result.messages:
            logs[WARNINGS_TAG] = "\n".join(result.messages)
        if logs:
            self._trainer.log(logs)


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (same param groups)."""
    if type(optimizer).__name__ == "AcceleratedOptimizer":
        return optimizer.optimizer
    return optimizer


def _calling_trainer() -> Trainer:
    """The :class:`transformers.Trainer` whose callback handler is calling us.

    ``TrainerCallback`` events receive the model, optimizer and loaders but not the Trainer;
    its ``log`` is what routes metrics to ``log_history`` and every ``report_to``
    integration, so the Trainer is found on the call stack (the nearest ``self`` that is a
    Trainer, subclasses included).
    """
    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    raise RuntimeError(
        "CoherenceTrainerCallback must be called by a transformers.Trainer "
        "(Trainer(..., callbacks=[CoherenceTrainerCallback()]))"
    )


def _described_tensorboard(trainer: Trainer) -> list[TensorBoardLog]:
    """Wrap each TensorBoardCallback's writer so that the probe's tags carry descriptions."""
    logs = []
    for cb in trainer.callback_handler.callbacks:
        if not isinstance(cb, TensorBoardCallback) or cb.tb_writer is None:
            continue
        writer = cb.tb_writer
        if not isinstance(writer, DescribedWriter):
            cb.tb_writer = DescribedWriter(writer, TENSORBOARD_PREFIX)
        else:
            writer = writer._writer
        logs.append(TensorBoardLog(writer, prefix=TENSORBOARD_PREFIX))
    return logs


def _broadcast(result: ProbeResult | None, world_size: int) -> ProbeResult:
    """Rank zero's result on every rank (``torch.distributed``, when initialised)."""
    dist = torch.distributed
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    assert result is not None
    return result


def _scale_scheduler(lr_scheduler: Any, ratio: float) -> None:
    """Keep an ``on_unstable="adjust_lr"`` change: scale the scheduler's base lrs too."""
    base = getattr(lr_scheduler, "base_lrs", None)
    if base is not None and math.isfinite(ratio):
        lr_scheduler.base_lrs = [b * ratio for b in base]
