""":class:`CoherenceProbe`: measure -> assess -> decide -> commit, and its saved state.

The probe shared by :class:`~torch_coherence.CoherenceMonitor` and the Lightning callback. The
integrations decide *when* to call :meth:`CoherenceProbe.measure` (after :meth:`due`) and
:meth:`CoherenceProbe.commit`, how to reach the optimizer and where to send metrics; they call
:meth:`CoherenceProbe.start` at fit start and resume and :meth:`CoherenceProbe.observe` after
each optimizer step. The parts, each in its own module:

* :mod:`.schedule`: optimizer steps, time budget, pre-flight and triggered probes;
* :mod:`.assess`: the pure assessment (report and metrics) and its functional twin
  :func:`~torch_coherence.probe.assess`;
* :mod:`.policy`: criterion, hysteresis, actions;
* :mod:`.messages`: every sentence and the warning categories;
* :mod:`.tags`: the metric tags.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..theory import StabilityReport
from . import data as _data
from . import light as _light
from . import messages as text
from . import schedule as _schedule
from .assess import (
    Assessment,
    Estimate,
    _unwrap,
    assess,
    effective_optimizer_params,
    linear_dynamics,
)
from .data import sample_probe
from .messages import CoherenceProbeError, CoherenceWarning, UnstableTrainingError
from .policy import ACT_ON, CRITERIA, ON_UNSTABLE, Policy, PolicyState, set_learning_rate
from .schedule import Schedule, count_target

__all__ = ["CoherenceProbe", "ProbeResult", "sample_probe", "shared_options"]

#: Assumed cost of the Lyapunov part before it has been timed once (seconds). At scheduled
#: probes it runs only when it fits in the ``max_overhead`` budget.
LYAPUNOV_FIRST_SECONDS = 1.0
#: Optimizer steps of the blow-up lookahead when :mod:`torch_coherence.lookahead` does not
#: name its own default (``DEFAULT_STEPS``).
LOOKAHEAD_STEPS = 10
#: Multiples of the lr tried on the first lookahead draw, to bracket ``stability/blowup_lr``
#: (only the current lr, multiple 1, decides the prediction).
LOOKAHEAD_MULTIPLES = (1.0, 2.0, 4.0)
#: Edge of stability: the sharpness within this fraction of the GD bound (or two standard
#: errors of the sharpness estimate, whichever is larger) counts as "at" the bound.
EOS_REL_TOL = 0.1

#: Options of :class:`CoherenceProbe` that :class:`~torch_coherence.CoherenceMonitor` and
#: :class:`~torch_coherence.callbacks.CoherenceCallback` take under the same names, with the
#: same defaults (a test compares the signatures), and forward unchanged: they are
#: documented here, on :class:`CoherenceProbe`, and validated by its constructor.
SHARED_OPTIONS = (
    "every_n_steps",
    "max_overhead",
    "probe_size",
    "on_unstable",
    "margin_warning",
    "lr_safety",
    "sharpness",
    "seed",
    "mean_square_rate",
    "lyapunov",
    "criterion",
    "forward_fn",
    "engine_kwargs",
)

#: Newer options of :class:`CoherenceProbe` an integration may forward under the same names
#: (:func:`shared_options` passes those it finds).
EXTRA_OPTIONS = ("act_on", "max_triggered", "lookahead", "estimates")

#: What ``estimates`` accepts: ``"dataset"``, the sharpness of the training loss
#: (:func:`~torch_coherence.curvature.dataset_sharpness`: all n examples up to 2048, else a
#: seeded sample of 2048) and sigma_n over the training set (:func:`exact_sigma` when
#: n <= :data:`EXACT_SIGMA_MAX`, else :func:`estimate_sigma` with m = :data:`SIGMA_PROBE_M`);
#: ``"probe"``, the sharpness and sigma of the probe's own m examples (n = m, said in the
#: tags); ``"auto"`` (the default), ``"dataset"`` when the training dataset is known (a
#: dataset or loader given as ``probe`` or to :meth:`CoherenceProbe.set_probe`), else
#: ``"probe"`` (explicit probe tensors only).
ESTIMATES = ("auto", "dataset", "probe")
#: Data sets up to this size get the exact sigma_n (all n^2 pairs), larger ones the PPS
#: estimate: at n = 500 the exact value costs about what the m = 256 estimate does
#: (``docs/estimates.md``).
EXACT_SIGMA_MAX = 500
#: Probe size of :func:`~torch_coherence.curvature.estimate_sigma` (within 3% of sigma_n on
#: seven setups, ``docs/estimates.md``).
SIGMA_PROBE_M = 256


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: small and picklable (it is broadcast under DDP).

    Attributes:
        step: optimizer-step count at which the probe ran.
        metrics: tag -> value (see :data:`~torch_coherence.probe.TAGS`); empty when the
            probe failed.
        report: the stability report, or ``None`` when the probe failed or the learning rate
            was 0.
        error: a one-line description of the failure, or ``None``.
        messages: warnings to emit at this probe (after hysteresis).
        categories: the warning category of each message.
        armed: the hysteresis state after this probe (:class:`~.policy.PolicyState`).
        stop: whether training should stop.
        new_lr: the learning rate set by ``on_unstable="adjust_lr"``, else ``None``.
        raise_error: whether :meth:`CoherenceProbe.commit` raises.
        next_step: the optimizer-step count at which the next scheduled probe is due.
        kind: ``"scheduled"``, ``"preflight"``, ``"triggered"``, ``"light"`` (a scheduled
            probe whose full cost did not fit the budget, replaced by the tracked sharpness of
            :mod:`.light`; no report) or ``"postponed"``: a scheduled probe for which not even
            a light one fitted; nothing was measured (no metrics, no history entry), only
            ``next_step`` moves.
        trigger: why a triggered probe ran, else ``None``.
        lr: the learning rate the probe saw (``None`` when it could not be read).
        seconds: wall time of the probe.
        lookahead: the lookahead result, or ``None`` when none ran.
        updates: the probe's own state changes, applied by :meth:`CoherenceProbe.commit`.
        escalate: a light probe's reason to run a full (triggered) probe at once, else
            ``None`` (:func:`.light.escalation`).
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: StabilityReport | None = None
    error: str | None = None
    messages: tuple[str, ...] = ()
    categories: tuple[type[Warning], ...] = ()
    armed: PolicyState = field(default_factory=PolicyState)
    stop: bool = False
    new_lr: float | None = None
    raise_error: bool = False
    next_step: int = 0
    kind: str = "scheduled"
    trigger: str | None = None
    lr: float | None = None
    seconds: float = 0.0
    lookahead: Any = None
    updates: dict[str, Any] = field(default_factory=dict)
    escalate: str | None = None


def shared_options(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SHARED_OPTIONS` entries of ``values`` (an integration's ``locals()``),
    and those of :data:`EXTRA_OPTIONS` it has."""
    out = {name: values[name] for name in SHARED_OPTIONS}
    out.update({name: values[name] for name in EXTRA_OPTIONS if name in values})
    return out


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_fraction(name: str, value: object, *, upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    ok = 0 < value < 1 if upper_open else 0 < value <= 1
    if not ok:
        bound = "(0, 1)" if upper_open else "(0, 1]"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")
    return float(value)


def _default_engine(*args: Any, **kwargs: Any) -> Any:
    from ..curvature import measure_curvature

    return measure_curvature(*args, **kwargs)


def _default_lookahead() -> Any:
    """The module :mod:`torch_coherence.lookahead`, or ``None`` where it is not installed."""
    try:  # by module path: the package exports a function of the same name
        return importlib.import_module("torch_coherence.lookahead")
    except ImportError:
        return None


def _single_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The one torch optimizer the lookahead steps (a Lightning wrapper, accelerate's wrapper
    or a one-optimizer composite unwrapped); several optimizers are refused (named in the
    lookahead's note)."""
    opt = _unwrap(optimizer)
    inner = getattr(opt, "optimizers", None)
    if not isinstance(opt, torch.optim.Optimizer) and isinstance(inner, (list, tuple)):
        if len(inner) != 1:
            raise TypeError(
                f"the lookahead steps one optimizer; this model trains with {len(inner)}"
            )
        opt = _unwrap(inner[0])
    # accelerate's AcceleratedOptimizer (transformers.Trainer) is an Optimizer holding the
    # real one as ``.optimizer``, with a lock that cannot be copied
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        if opt.optimizer is opt:
            break
        opt = opt.optimizer
    return opt


def _batch_loss(loss: Any) -> Any:
    """``loss`` as the lookahead takes it, ``loss(outputs, targets) -> scalar`` over a batch.

    A loss module is batch-wise already; a per-sample callable ``loss(output_i, target_i)``
    (which the engine takes, e.g. a causal LM's shifted cross-entropy of one sequence)
    becomes the mean of its per-sample values, the training loss of the engine's convention
    (:func:`~torch_coherence.curvature.losses.per_sample_losses`).
    """
    if isinstance(loss, nn.Module):
        return loss
    from ..curvature.losses import per_sample_losses

    def mean_loss(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return per_sample_losses(loss, outputs, targets).mean()

    return mean_loss


def _default_tracker(*args: Any, **kwargs: Any) -> Any:
    from ..curvature.tracked_sharpness import tracked_sharpness

    return tracked_sharpness(*args, **kwargs)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Whether two parameter lists are the same tensors in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _preserved(model: nn.Module) -> Any:
    from .._state import preserved_state

    return preserved_state(model)


class CoherenceProbe:
    """Schedule, measurement, assessment, warnings and history of the coherence probe.

    Args:
        loss: the training loss as the engine accepts it (e.g. ``nn.CrossEntropyLoss()``,
            ``nn.MSELoss()``); may be set later through :attr:`loss`.
        probe: explicit probe data: an ``(inputs, targets)`` pair of tensors, a dataset of
            ``(input, target)`` samples or a data loader (its dataset is sampled; the loader
            is never iterated, so its shuffling RNG is untouched). ``None``: supplied later
            with :meth:`set_probe` (the Lightning callback passes the training set). The
            dataset is kept: the blow-up lookahead draws its batches from it.
        probe_size: number of examples drawn (seeded, without replacement) from a dataset or
            loader; explicit tensors are used whole.
        dataset_size: n, the size of the training set the numbers refer to; may be set later.
        every_n_steps: scheduled probes every this many optimizer steps (at least; see
            ``max_overhead``).
        max_overhead: time budget of the scheduled probes and of the optional parts
            (lookahead and gamma at scheduled probes, figures): a scheduled probe runs
            in full when the budgeted wall time, it included at the last full probe's cost,
            is at most this fraction of the training time since the fit's first step; else
            a light probe (:mod:`torch_coherence.probe.light`: the tracked sharpness on a
            fresh batch, about one or two training steps) runs in its place when that fits,
            else it is postponed. The pre-flight probe (:meth:`start`) and the triggered ones
            (:meth:`observe`, a light probe's escalation) are outside it. ``None``: a fixed
            schedule, everything at every probe. The default 3% with ``every_n_steps=100``
            gives a fit of 1000 steps of 10 ms the pre-flight probe and 9-10 scheduled (full
            or light) ones; see ``docs/warnings_messages.md`` for the measured trade-off.
        on_unstable: ``"warn"``, ``"raise"`` (:class:`UnstableTrainingError`; a failing probe
            raises :class:`CoherenceProbeError`), ``"stop"`` or ``"adjust_lr"``, taken when
            the verdict of ``act_on`` fires.
        margin_warning: note once when the linear margin first reaches this value
            (0 < x < 1); ``None`` says nothing before 1.
        lr_safety: ``"adjust_lr"`` sets the learning rate to this fraction of the critical one
            (the lookahead's blow-up lr with ``act_on="blowup"``, else the criterion's).
        sharpness: which sharpness the engine computes besides the Gram matrix
            (``"both"``, ``"hessian"``, ``"ggn"`` or ``None``: the GGN sharpness of the probe's
            Gram only, the cheapest).
        seed: seed of the probe-batch draw, the lookahead's batches and the engine.
        mean_square_rate: also log rho(T), the exact mean-square rate of the linearized
            dynamics (with the optimizer's momentum and SAM's rho and normaliser); the
            engine then returns the whole block Gram, (m R)^2 doubles. Implied by
            ``criterion="mean_square"``.
        lyapunov: also compute gamma, the top Lyapunov exponent of the linearized dynamics,
            and the typical critical learning rate where it crosses 0, on the first
            :data:`~torch_coherence.probe.assess.LYAPUNOV_SAMPLES` probe examples standing
            for the n training examples. It costs about 1 s (64 examples, 10 classes, one
            CPU thread; more on a loaded machine): it runs only when it fits in the budget
            (at every probe with ``max_overhead=None``). Needs the probe's block Gram
            (m R <= 1024, or ``engine_kwargs={"return_gram": True}``).
        criterion: the linear verdict, one of :data:`~torch_coherence.probe.policy.CRITERIA`
            (default ``"typical"``: gamma > 0; Theorem 1 when gamma is not available). It is
            warned with :class:`LinearInstabilityWarning`: "expect a loss spike or a move to
            flatter weights, not necessarily divergence".
        act_on: what ``on_unstable`` acts on: ``"blowup"`` (default), the lookahead's
            prediction, warned with :class:`BlowupWarning`; or ``"linear"``, the verdict of
            ``criterion``.
        max_triggered: the most probes :meth:`observe` triggers in one fit.
        lookahead: run the blow-up lookahead (:mod:`torch_coherence.lookahead`: real
            optimizer steps on a copy of the model at the current learning rate and a few
            multiples, on training batches of size B drawn with the probe's own generator)
            at the pre-flight and triggered probes and, within the budget, at scheduled
            ones. Needs the training dataset (passed through ``probe`` or :meth:`set_probe`).
        estimates: the sharpness and sigma the thresholds use, one of :data:`ESTIMATES`.
            The default ``"auto"`` uses the training set's (``"dataset"``) whenever the
            training dataset is known: passes over it (up to 2048 examples) at every full
            probe, far more accurate (``docs/estimates.md``) and more costly than the probe's
            own values; without it (explicit probe tensors) the probe's own, n = m said in
            the tags. ``"probe"`` asks for the probe's own values. A probe the guard
            triggers computes them only when their last cost fits the budget (the blow-up
            lookahead is what it needs at once).
        forward_fn: ``forward_fn(model, inputs) -> outputs`` when ``model(inputs)`` is not the
            forward pass the loss expects.
        engine_kwargs: further keyword arguments for :func:`torch_coherence.measure_curvature`.
        engine: the measuring function (default :func:`torch_coherence.measure_curvature`).
        lookahead_module: where ``draw_batches`` and ``lookahead`` come from (default
            :mod:`torch_coherence.lookahead`).
        tracker: the light probe's function (default
            :func:`torch_coherence.curvature.tracked_sharpness`).

    Raises:
        ValueError: an argument is out of range; the message names it.
    """

    def __init__(
        self,
        *,
        loss: Any = None,
        probe: Any = None,
        probe_size: int = 64,
        dataset_size: int | None = None,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.03,
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
        engine: Callable[..., Any] | None = None,
        lookahead_module: Any = None,
        tracker: Callable[..., Any] | None = None,
    ) -> None:
        _check_int("every_n_steps", every_n_steps, 1)
        if max_overhead is not None:
            _check_fraction("max_overhead", max_overhead, upper_open=True)
        self.probe_size = _check_int("probe_size", probe_size, 2)
        if dataset_size is not None:
            _check_int("dataset_size", dataset_size, 1)
        if on_unstable not in ON_UNSTABLE:
            raise ValueError(f"on_unstable must be one of {ON_UNSTABLE}, got {on_unstable!r}")
        if margin_warning is not None:
            _check_fraction("margin_warning", margin_warning, upper_open=True)
        if sharpness not in ("both", "hessian", "ggn", None):
            raise ValueError(
                f"sharpness must be 'both', 'hessian', 'ggn' or None, got {sharpness!r}"
            )
        _check_int("seed", seed, 0)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if act_on not in ACT_ON:
            raise ValueError(f"act_on must be one of {ACT_ON}, got {act_on!r}")
        _check_int("max_triggered", max_triggered, 0)
        if estimates not in ESTIMATES:
            raise ValueError(f"estimates must be one of {ESTIMATES}, got {estimates!r}")
        for name, flag in (("lyapunov", lyapunov), ("lookahead", lookahead)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if criterion == "typical" and not lyapunov:
            raise ValueError(
                "criterion='typical' needs lyapunov=True (gamma is the typical criterion); "
                "pass criterion='theorem1' or 'mean_square' to switch gamma off"
            )
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError("forward_fn must be callable or None")
        if engine_kwargs is not None and not isinstance(engine_kwargs, dict):
            raise ValueError(f"engine_kwargs must be a dict, got {type(engine_kwargs).__name__}")
        self.schedule = Schedule(every_n_steps, max_overhead, max_triggered)
        self.policy = Policy(
            criterion=criterion,
            on_unstable=on_unstable,
            act_on=act_on,
            margin_warning=margin_warning,
            lr_safety=_check_fraction("lr_safety", lr_safety),
        )
        self.state = PolicyState()
        self.loss = loss
        self.dataset_size = dataset_size
        self.sharpness = sharpness
        self.seed = seed
        self.mean_square_rate = bool(mean_square_rate) or criterion == "mean_square"
        self.lyapunov = lyapunov
        self.lookahead = lookahead
        self.estimates = estimates
        self._dataset_vector: torch.Tensor | None = None
        self._dataset_params: tuple[torch.Tensor, ...] = ()
        self._dataset_known = False
        self._tracker = tracker or _default_tracker
        self._tracked: _light.Tracked | None = None
        self._light_seconds: float | None = None
        self._dataset_seconds: float | None = None
        self._dataset_error: BaseException | None = None
        self.forward_fn = forward_fn
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine = engine or _default_engine
        self._lookahead_module = lookahead_module
        self._lyapunov_seconds = LYAPUNOV_FIRST_SECONDS
        self._lookahead_seconds: float | None = None
        self._batch: tuple[Any, Any] | None = None
        self._device_batch: tuple[Any, Any, torch.device] | None = None
        self.train_dataset: Any = None
        self.history: list[dict[str, Any]] = []
        # caches written by measure (they change no decision): the last engine report and
        # the warm start of the Hessian sharpness
        self.last_curvature: Any = None
        self._warm_vector: torch.Tensor | None = None
        self._warm_params: tuple[torch.Tensor, ...] = ()
        self.last_report: StabilityReport | None = None
        self._hook: Any = None
        if probe is not None:
            self.set_probe(probe)

    # ------------------------------------------------------------------ settings
    on_unstable = property(lambda self: self.policy.on_unstable)
    criterion = property(lambda self: self.policy.criterion)
    act_on = property(lambda self: self.policy.act_on)
    margin_warning = property(lambda self: self.policy.margin_warning)
    lr_safety = property(lambda self: self.policy.lr_safety)
    every_n_steps = property(lambda self: self.schedule.every_n_steps)
    max_overhead = property(lambda self: self.schedule.max_overhead)
    max_triggered = property(lambda self: self.schedule.max_triggered)

    @property
    def armed(self) -> PolicyState:
        """The hysteresis state (see :class:`~torch_coherence.probe.policy.PolicyState`)."""
        return self.state

    # ------------------------------------------------------------------ probe data
    @property
    def has_probe(self) -> bool:
        """Whether the probe batch is set."""
        return self._batch is not None

    @property
    def probe_batch(self) -> tuple[Any, Any] | None:
        """The fixed ``(inputs, targets)`` probe batch (on CPU), or ``None``."""
        return self._batch

    def set_probe(self, probe: Any) -> None:
        """Fix the probe batch from tensors, a dataset or a data loader (see the class doc).

        A dataset (a loader's dataset) is kept as :attr:`train_dataset`, from which the
        lookahead draws its batches; explicit tensors serve as that dataset themselves.
        """
        if isinstance(probe, (tuple, list)) and len(probe) == 2 and _data.is_batch_like(probe[0]):
            inputs, targets = probe
            if _data.length(inputs) < 1 or _data.length(inputs) != _data.length(targets):
                raise ValueError(
                    "probe must be an (inputs, targets) pair with the same, non-zero number "
                    f"of examples, got {_data.length(inputs)} and {_data.length(targets)}"
                )
            self._batch = (_data.detach(inputs), _data.detach(targets))
            self.train_dataset = _data.Pairs(*self._batch)
            self._dataset_known = False
        else:
            dataset = getattr(probe, "dataset", probe)
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise ValueError(
                    "probe must be an (inputs, targets) pair of tensors, a map-style dataset or "
                    f"a DataLoader over one, got {type(probe).__name__}"
                )
            self._batch = sample_probe(dataset, self.probe_size, self.seed)
            self.train_dataset = dataset
            self._dataset_known = True
        self._device_batch = None

    @property
    def uses_dataset_estimates(self) -> bool:
        """Whether full probes log the training set's sharpness and sigma (``estimates``)."""
        if self.estimates == "auto":
            return self._dataset_known
        return self.estimates == "dataset"

    def _batch_on(self, device: torch.device) -> tuple[Any, Any]:
        assert self._batch is not None
        if self._device_batch is None or self._device_batch[2] != device:
            x, y = self._batch
            self._device_batch = (_data.to(x, device), _data.to(y, device), device)
        return self._device_batch[0], self._device_batch[1]

    # ------------------------------------------------------------------ schedule
    @property
    def steps(self) -> int:
        """Optimizer steps counted so far."""
        return self.schedule.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.schedule.steps = int(value)

    @property
    def last_probe_step(self) -> int:
        return self.schedule.last_probe_step

    @property
    def next_probe_step(self) -> int:
        """The optimizer-step count at which the next probe is due."""
        return self.schedule.next_probe_step

    @property
    def probe_seconds(self) -> float:
        """Wall time of the budgeted work so far (scheduled probes, optional parts, figures)."""
        return self.schedule.probe_seconds

    def attach(self, optimizer: Any) -> None:
        """Count the optimizer's steps with a post-step hook (SAM: its base optimizer's)."""
        self.detach()
        self._hook = count_target(optimizer).register_step_post_hook(self._on_step)

    def detach(self) -> None:
        """Remove the step hook installed by :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_step(self, *_: Any) -> None:
        self.count_step()

    def count_step(self) -> None:
        """Count one optimizer step (the hook of :meth:`attach` calls this)."""
        self.schedule.count_step()

    def start(self) -> None:
        """A fit starts or resumes: the next :meth:`due` is true (the pre-flight probe).

        Call it once at fit start and at resume, before the first optimizer step, so that
        the weights are judged at the current learning rate and batch size before anything
        can blow up.
        """
        self.schedule.start()

    def observe(self, loss: float | None = None, lr: float | None = None) -> bool:
        """Per-step guard on what the loop already computed; whether it triggered a probe.

        Call it after each optimizer step. A non-finite loss, a loss above
        :data:`~torch_coherence.probe.schedule.SPIKE_FACTOR` times its running median, or a
        learning rate changed by more than
        :data:`~torch_coherence.probe.schedule.LR_FACTOR` since the last probe makes
        :meth:`due` true at once (outside the time budget; at most ``max_triggered`` per
        fit).

        Under DDP :meth:`due` must agree on every rank (rank zero measures, the others wait
        for its result): pass every rank the same values (the loss averaged over the ranks,
        or rank zero's broadcast), or call it on every rank with the same flags.

        Args:
            loss: the training loss of the step just taken (a float or a 0-d tensor).
            lr: the optimizer's current (largest) learning rate.
        """
        return self.schedule.observe(loss, lr)

    def due(self) -> bool:
        """Whether a probe is due (scheduled, pre-flight or triggered)."""
        return self.schedule.due()

    def affordable(self, seconds: float) -> bool:
        """Whether ``seconds`` more diagnostic work keeps within the ``max_overhead`` budget.

        Always true without a budget. The integrations ask this before optional extras
        (the phase-plane figure) and then :meth:`charge` what they spent.
        """
        return self.schedule.affordable(seconds)

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of other diagnostic work (a figure) against the time budget."""
        self.schedule.charge(seconds)

    # ------------------------------------------------------------------ measurement
    def measure(self, model: nn.Module, optimizer: Any, batch_size: float) -> ProbeResult:
        """Run the engine (and the lookahead) on the model, assess, decide.

        Records nothing that changes a decision: the step count, schedule, hysteresis,
        history and cost estimates change only in :meth:`commit`, from the returned result
        (under DDP every rank commits rank zero's result). It writes caches that only the
        measuring rank reads: :attr:`last_curvature`, the warm starts of the sharpness
        Lanczos runs and the top eigenvector the light probes track. The model's
        parameters, buffers, gradients, train/eval modes and the global RNG are restored
        bit-identically; the optimizer is only read.

        Args:
            model: the network (its ``forward`` or :attr:`forward_fn` gives the outputs).
            optimizer: where learning rate, momentum, weight decay and SAM's rho are read.
            batch_size: the effective batch size B of one optimizer step (all devices and
                accumulated micro-batches together).
        """
        step, kind = self.steps, self.schedule.kind
        trigger = self.schedule.pending if kind == "triggered" else None
        if self._batch is None:
            raise ValueError("the probe batch is not set: pass probe= or call set_probe()")
        if self.loss is None:
            raise ValueError("loss is not set: pass loss= (e.g. torch.nn.CrossEntropyLoss())")
        if self.dataset_size is None:
            raise ValueError("dataset_size is not set: pass dataset_size= (n, the train size)")
        if kind == "scheduled":
            later = self.schedule.postponed_step()
            if later is not None:  # its cost does not fit yet: a light probe, or nothing
                light = self._light_probe(model, optimizer, step)
                if light is not None:
                    return light
                if self._tracked is not None:  # the step where a light one fits
                    cost = self._light_cost()
                    later = min(later, max(self.schedule.next_step(step, cost, 0.0), step + 1))
                return ProbeResult(step=step, armed=self.state, next_step=later, kind="postponed")
        start = _schedule.now()
        lr = None
        try:
            settings = effective_optimizer_params(optimizer)
            lr = float(settings["lr"])
            dataset = self._dataset_now(kind, trigger)
            assessment, curv = self._assess(model, settings, batch_size, dataset)
            extras, updates = self._extras(model, optimizer, assessment, curv, kind, start)
        except Exception as err:  # any failure of a diagnostic is reported
            cost = _schedule.now() - start
            return self._failed(step, kind, trigger, err, cost, lr)
        cost = _schedule.now() - start
        assessment.metrics["probe/seconds"] = cost
        decision = self.policy.decide(
            step,
            assessment,
            self.state,
            lookahead=extras["lookahead"],
            edge_of_stability=self._edge_of_stability(assessment),
            gram_missing=extras["gram_missing"],
        )
        notes, state = self._notes(step, optimizer, extras, decision.state)
        return ProbeResult(
            step=step,
            metrics=assessment.metrics,
            report=assessment.report,
            messages=tuple(m for m, _ in notes) + decision.messages,
            categories=tuple(c for _, c in notes) + decision.categories,
            armed=state,
            stop=decision.stop,
            new_lr=decision.new_lr,
            raise_error=decision.raise_error,
            next_step=self._next_step(step, kind, cost, base=cost - sum(updates.values())),
            kind=kind,
            trigger=trigger,
            lr=lr,
            seconds=cost,
            lookahead=extras["lookahead"],
            updates=updates,
        )

    def _dataset_now(self, kind: str, trigger: str | None) -> bool:
        """Whether this full probe computes the data-set estimates: at pre-flight, scheduled
        and light-escalated probes whenever ``estimates`` asks for them; at a probe the guard
        triggered (a loss spike, an lr change) only when their last cost fits the budget, so
        that the guard's immediate probes cost the probe and the lookahead (the blow-up
        prediction), not hundreds of training steps each. Such a probe logs the probe's own
        values, n = m."""
        if not self.uses_dataset_estimates:
            return False
        if kind != "triggered" or (trigger or "").startswith(_light.ESCALATION_PREFIX):
            return True
        return self.schedule.affordable(self._dataset_seconds or 0.0)

    def _assess(
        self,
        model: nn.Module,
        settings: dict[str, float | None],
        batch_size: float,
        dataset: bool = False,
    ) -> tuple[Assessment, Any]:
        n = int(self.dataset_size)  # type: ignore[arg-type]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        inputs, targets = self._batch_on(device)
        kwargs = dict(self.engine_kwargs)
        kwargs.setdefault("sharpness", self.sharpness)
        kwargs.setdefault("seed", self.seed)
        if self.forward_fn is not None:
            kwargs.setdefault("forward_fn", self.forward_fn)
        plist = self._params(model)
        warm = self._warm_vector is not None and _same(self._warm_params, plist)
        if warm and kwargs["sharpness"] is not None:  # of the same parameters only
            kwargs.setdefault("init_vector", self._warm_vector)
        if self.mean_square_rate:
            kwargs.setdefault("return_gram", True)  # rho(T) needs K even when m R > 1024
        grad_sq = None
        with _preserved(model):
            curv = self._engine(model, inputs, targets, self.loss, n=n, **kwargs)
            if settings["sam_rho"] is not None:
                grad_sq = getattr(curv, "mean_gradient_sq_norm", None)
                if grad_sq is None:  # an engine without it: one backward pass
                    grad_sq = _mean_gradient_sq_norm(
                        model, inputs, targets, self.loss, self.forward_fn
                    )
            sharp = sigma = None
            self._dataset_error = None
            if dataset:
                t0 = _schedule.now()
                try:
                    sharp, sigma = self._dataset_estimates(model, plist)
                except Exception as err:  # "auto": the probe's own values stand, said once
                    if self.estimates != "auto":
                        raise
                    self._dataset_error = err
                self._dataset_seconds = _schedule.now() - t0
        self.last_curvature = curv
        warm = getattr(curv, "sharpness_vector", None)
        self._warm_vector = warm if isinstance(warm, torch.Tensor) else None
        self._warm_params = plist
        self._tracked = self._tracked_from(curv, sharp, plist) or self._tracked
        assessment = assess(
            curv,
            settings,
            batch_size,
            n,
            sharpness=sharp,
            sigma=sigma,
            mean_grad_sq=grad_sq,
            mean_square_rate=self.mean_square_rate,
            seed=self.seed,
            m=_data.length(inputs),
        )
        return assessment, curv

    def _params(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """The trainable parameters measured, in the engine's order: those of
        ``engine_kwargs["params"]`` (names or tensors), else all with ``requires_grad``."""
        from ..curvature.measure import _select_params

        return tuple(_select_params(model, self.engine_kwargs.get("params")).values())

    def _tracked_from(
        self, curv: Any, sharp: Estimate | None, plist: tuple[torch.Tensor, ...]
    ) -> _light.Tracked | None:
        """The eigenvector the light probes track (of the parameters ``plist``): the training
        loss's (data-set estimates), else the engine's Hessian one of the probe batch, else
        none."""
        if sharp is not None and isinstance(self._dataset_vector, torch.Tensor):
            kind = "hessian" if self.sharpness == "hessian" else "ggn"
            if kind == "ggn" and self._tracker is _default_tracker:
                from ..curvature.tracked_sharpness import warm_up

                warm_up()  # once per process: not in the first light probe's cost
            return _light.Tracked(self._dataset_vector, kind, sharp.value, self.steps, plist)
        if self._warm_vector is None:
            return None
        value = getattr(curv, "hessian_sharpness", None)
        value = float(value) if value is not None and math.isfinite(float(value)) else 0.0
        return _light.Tracked(self._warm_vector, "hessian", value, self.steps, plist)

    def _light_cost(self) -> float:
        """The last light probe's cost, or before the first one an estimate from the training
        step time (:data:`.light.FIRST_COST_STEPS` steps)."""
        if self._light_seconds is not None:
            return self._light_seconds
        per_step = self.schedule.training_seconds() / max(self.steps - self.schedule.t0_steps, 1)
        return _light.FIRST_COST_STEPS * per_step

    def _light_probe(self, model: nn.Module, optimizer: Any, step: int) -> ProbeResult | None:
        """The tracked sharpness in place of a postponed full probe, when it fits the budget
        (:mod:`.light`); ``None`` when there is no eigenvector to track or it does not fit.

        A failure is reported like a failed probe, and the eigenvector is dropped until the
        next full probe; so is an eigenvector of other parameters than the trainable ones
        measured now (a layer frozen or unfrozen since), without a probe."""
        tracked = self._tracked
        if tracked is None or self.train_dataset is None:
            return None
        try:
            plist = self._params(model)
        except ValueError:  # no trainable parameter: nothing to track
            plist = ()
        if not plist or (tracked.params and not _same(tracked.params, plist)):
            self._tracked = None
            return None
        if not self.schedule.affordable(self._light_cost()):
            return None
        start = _schedule.now()
        lr = None
        try:
            settings = effective_optimizer_params(optimizer)
            lr = float(settings["lr"])
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            x, y = _light.draw_batch(self.train_dataset, self.probe_size, self.seed, step, device)
            res = self._tracker(
                model,
                self.loss,
                x,
                y,
                tracked.vector,
                kind=tracked.kind,
                n=len(self.train_dataset),
                forward_fn=self.forward_fn,
                params=list(plist),
            )
        except Exception as err:  # reported; training goes on
            self._tracked = None
            return self._failed(step, "light", None, err, _schedule.now() - start, lr)
        cost = _schedule.now() - start
        metrics = _light.metrics(res)
        metrics["probe/seconds"] = cost
        return ProbeResult(
            step=step,
            metrics=metrics,
            armed=self.state,
            next_step=self.schedule.next_step(step, cost, cost),
            kind="light",
            lr=lr,
            seconds=cost,
            escalate=_light.escalation(res.value, settings, tracked),
        )

    def _dataset_estimates(
        self, model: nn.Module, plist: tuple[torch.Tensor, ...]
    ) -> tuple[Estimate, Estimate]:
        """The training loss's sharpness and sigma_n over the training set, both of the
        parameters ``plist`` the engine measures (the sharpness warm-started from the last
        probe's eigenvector when it is of the same parameters, a cache like the engine's):
        the exact sigma_n up to :data:`EXACT_SIGMA_MAX` examples, the PPS estimate above."""
        from ..curvature import dataset_sharpness, estimate_sigma, exact_sigma

        if self.train_dataset is None:
            raise ValueError("estimates='dataset' needs the training dataset (set_probe)")
        kind = "hessian" if self.sharpness == "hessian" else "ggn"
        params = list(plist)
        common = {"seed": self.seed, "forward_fn": self.forward_fn, "params": params}
        warm = self._dataset_vector if _same(self._dataset_params, plist) else None
        sharp = dataset_sharpness(
            model, self.loss, self.train_dataset, kind=kind, init_vector=warm, **common
        )
        self._dataset_vector, self._dataset_params = sharp.vector, plist
        if len(self.train_dataset) <= EXACT_SIGMA_MAX:
            sig = exact_sigma(
                model, self.loss, self.train_dataset, forward_fn=self.forward_fn, params=params
            )
        else:
            sig = estimate_sigma(model, self.loss, self.train_dataset, m=SIGMA_PROBE_M, **common)
        stderr = float(sig.stderr)
        return Estimate(float(sharp.value), int(sharp.n_samples)), Estimate(
            float(sig.value), int(sig.n), stderr
        )

    def _extras(
        self,
        model: nn.Module,
        optimizer: Any,
        assessment: Assessment,
        curv: Any,
        kind: str,
        start: float,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The optional parts: gamma (within the budget at every probe) and the lookahead
        (outside the budget at pre-flight and triggered probes, within it at scheduled ones)."""
        extras: dict[str, Any] = {"lookahead": None, "lookahead_error": None}
        updates: dict[str, Any] = {}
        has_gram = getattr(curv, "gram", None) is not None
        extras["gram_missing"] = self.policy.criterion != "theorem1" and not has_gram
        positive = assessment.report is not None
        spent = _schedule.now() - start
        if self.lyapunov and has_gram and positive:
            # seconds to tens of seconds: within the budget at every kind of probe
            if self.schedule.affordable(self._lyapunov_seconds, spent):
                t0 = _schedule.now()
                assessment.metrics.update(
                    linear_dynamics(curv, assessment, lyapunov=True, seed=self.seed)
                )
                updates["lyapunov_seconds"] = _schedule.now() - t0
        module = self._lookahead_module or (_default_lookahead() if self.lookahead else None)
        if not (self.lookahead and positive and module is not None):
            return extras, updates
        if self.train_dataset is None:
            return extras, updates
        spent = _schedule.now() - start
        cost = self._lookahead_cost(module)
        if kind == "scheduled" and not self.schedule.affordable(cost, spent):
            return extras, updates
        t0 = _schedule.now()
        try:
            result = self._run_lookahead(module, model, optimizer, assessment.batch_size)
        except Exception as err:  # the rest of the probe stands
            extras["lookahead_error"] = err
            return extras, updates
        updates["lookahead_seconds"] = _schedule.now() - t0
        extras["lookahead"] = result
        assessment.metrics["stability/blowup_lr"] = float(result.blowup_lr)
        return extras, updates

    def _lookahead_steps(self, module: Any) -> tuple[int, ...]:
        """k of each independent short-run draw (the module's validated ``DEFAULT_STEPS``)."""
        steps = getattr(module, "DEFAULT_STEPS", (LOOKAHEAD_STEPS,))
        return tuple(int(k) for k in (steps if isinstance(steps, (tuple, list)) else (steps,)))

    def _lookahead_cost(self, module: Any) -> float:
        """The last lookahead's cost, or before the first one an estimate from the training
        step time (steps x multiples x 2: forward and backward of a copy)."""
        if self._lookahead_seconds is not None:
            return self._lookahead_seconds
        per_step = self.schedule.training_seconds() / max(self.steps - self.schedule.t0_steps, 1)
        steps = self._lookahead_steps(module)
        runs = steps[0] * len(LOOKAHEAD_MULTIPLES) + sum(steps[1:])
        return 2.0 * runs * per_step

    def _run_lookahead(self, module: Any, model: nn.Module, optimizer: Any, b: float) -> Any:
        """Real steps on a copy, on batches of B drawn with the probe's own generator
        (seeded by the seed, the step and the draw: the same on every rank and every rerun).

        The validated rule (``docs/warnings.md``): one short run at the current lr on each of
        ``DEFAULT_STEPS`` independent draws, a blow-up in either predicting one. The first
        draw also tries :data:`LOOKAHEAD_MULTIPLES` of the lr, which brackets
        ``stability/blowup_lr``; the result is the draw that blew up at the current lr (else
        the first) with the smallest blow-up lr over the draws, so ``predicted`` is "either
        draw blew up at the current lr" and a message quotes that draw's losses.
        """
        size = max(1, min(round(b), len(self.train_dataset)))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        results = []
        with _preserved(model):
            for draw, steps in enumerate(self._lookahead_steps(module)):
                gen = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + self.steps) * 101 + draw
                )
                batches = module.draw_batches(self.train_dataset, size, steps, gen)
                batches = [(_data.to(x, device), _data.to(y, device)) for x, y in batches]
                results.append(
                    module.lookahead(
                        model,
                        _single_optimizer(optimizer),
                        _batch_loss(self.loss),
                        batches,
                        multiples=LOOKAHEAD_MULTIPLES if draw == 0 else (1.0,),
                        blowup_factor=self.policy.blowup_factor,
                        forward_fn=self.forward_fn,
                    )
                )
        # the draw that blew up at the current lr (its losses are the ones a message quotes)
        pick = next((r for r in results if r.predicted), results[0])
        return replace(
            pick,
            blowup_lr=min(r.blowup_lr for r in results),
            seconds=sum(r.seconds for r in results),
        )

    def _edge_of_stability(self, assessment: Assessment) -> float | None:
        """The sharpness tolerance when at the GD bound while the loss keeps falling."""
        report = assessment.report
        if report is None or not self.schedule.loss_falling():
            return None
        se = assessment.sharpness.stderr
        tol = max(2.0 * se if math.isfinite(se) else 0.0, EOS_REL_TOL * report.gd_threshold)
        return tol if abs(report.sharpness - report.gd_threshold) <= tol else None

    def _notes(
        self, step: int, optimizer: Any, extras: dict[str, Any], state: PolicyState
    ) -> tuple[list[tuple[str, type[Warning]]], PolicyState]:
        """One-time notes: a non-SGD optimizer, a failed lookahead, failed data-set estimates."""
        notes: list[tuple[str, type[Warning]]] = []
        base = count_target(optimizer)
        if not state.noted_optimizer and not isinstance(base, torch.optim.SGD):
            notes.append((text.optimizer_note(type(base).__name__), CoherenceWarning))
            state = replace(state, noted_optimizer=True)
        err = extras["lookahead_error"]
        if err is not None and not state.noted_lookahead:
            notes.append((text.lookahead_failed(step, err), CoherenceWarning))
            state = replace(state, noted_lookahead=True)
        err = self._dataset_error
        if err is not None and not state.noted_dataset:
            notes.append((text.dataset_estimates_failed(step, err), CoherenceWarning))
            state = replace(state, noted_dataset=True)
        return notes, state

    def _next_step(self, step: int, kind: str, cost: float, base: float | None = None) -> int:
        """The next scheduled probe: the rhythm is stretched by the base probe's cost only
        (the optional parts ran because they fitted in what was left of the budget)."""
        sched = self.schedule
        base = cost if base is None else base
        if kind == "scheduled" or step >= sched.scheduled_step:
            return sched.next_step(step, base if kind == "scheduled" else 0.0, cost)
        return sched.scheduled_step

    def _failed(
        self,
        step: int,
        kind: str,
        trigger: str | None,
        err: BaseException,
        cost: float,
        lr: float | None,
    ) -> ProbeResult:
        raising = self.policy.on_unstable == "raise"
        if trigger is not None and trigger.startswith("non-finite"):
            msg = text.blown_up(step, trigger, err, raising)
        else:
            msg = text.failed(step, err, raising)
        return ProbeResult(
            step=step,
            error=msg,
            messages=(msg,),
            categories=(CoherenceWarning,),
            armed=self.state,
            raise_error=raising,
            next_step=self._next_step(step, kind, cost),
            kind=kind,
            trigger=trigger,
            lr=lr,
            seconds=cost,
        )

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        result: ProbeResult,
        optimizer: Any = None,
        warn: Callable[[str, type[Warning]], None] | None = None,
    ) -> None:
        """Record a result: schedule, history, hysteresis, warnings, learning-rate change, raise.

        Under DDP every rank commits the same (broadcast) result, so the state and the
        actions stay consistent across ranks.

        Args:
            result: from :meth:`measure`.
            optimizer: whose learning rate ``"adjust_lr"`` lowers.
            warn: ``warn(text, category)`` emits one warning (default :func:`warnings.warn`);
                ``category`` is :class:`CoherenceWarning` or a subclass
                (:class:`BlowupWarning`, :class:`LinearInstabilityWarning`).
        """
        base = result.seconds - sum(float(v) for v in result.updates.values())
        adjusts = result.new_lr is not None and optimizer is not None
        # the guard's reference is the lr in force after the probe: its own adjust_lr
        # lowering is no lr change to trigger on
        lr_after = result.new_lr if adjusts else result.lr
        self.schedule.record(
            result.step, result.kind, result.seconds, result.next_step, lr_after, base
        )
        if result.kind == "postponed":
            return
        if result.kind == "light":
            self._light_seconds = float(result.seconds)
            self.schedule.request(result.escalate)
        self.state = result.armed
        if "lyapunov_seconds" in result.updates:
            self._lyapunov_seconds = float(result.updates["lyapunov_seconds"])
        if "lookahead_seconds" in result.updates:
            self._lookahead_seconds = float(result.updates["lookahead_seconds"])
        if result.report is not None:
            self.last_report = result.report
        entry: dict[str, Any] = {"step": result.step, "kind": result.kind, **result.metrics}
        if result.trigger is not None:
            entry["trigger"] = result.trigger
        if result.escalate is not None:
            entry["escalate"] = result.escalate
        if result.error is not None:
            entry["error"] = result.error
        if result.messages:
            entry["warnings"] = list(result.messages)
        if result.report is not None:
            entry["lr"] = result.report.lr
            entry["batch_size"] = result.report.batch_size
        self.history.append(entry)
        emit = warn or _warn
        categories = result.categories or (CoherenceWarning,) * len(result.messages)
        for msg, category in zip(result.messages, categories, strict=False):
            emit(msg, category)
        if adjusts:
            set_learning_rate(optimizer, result.new_lr)
        if result.raise_error:
            if result.error is not None:
                raise CoherenceProbeError(result.error)
            msg = result.messages[-1] if result.messages else "unstable"
            raise UnstableTrainingError(msg, result.report, result.step)

    def run(
        self,
        model: nn.Module,
        optimizer: Any,
        batch_size: float,
        warn: Callable[[str, type[Warning]], None] | None = None,
    ) -> ProbeResult:
        """:meth:`measure` then :meth:`commit` (single process)."""
        result = self.measure(model, optimizer, batch_size)
        self.commit(result, optimizer, warn)
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Schedule, warning state and history (the probe batch is re-drawn from the seed)."""
        return {
            **self.schedule.state_dict(),
            "armed": self.state.as_dict(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, so that the curves continue."""
        self.schedule.load_state_dict(state)
        self.state = PolicyState.from_saved(state["armed"])
        self.history = [dict(h) for h in state["history"]]


def _mean_gradient_sq_norm(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss: Any,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
) -> float:
    """|g_m|^2 by one backward pass, for an engine whose report lacks
    ``mean_gradient_sq_norm`` (= 1^T P 1 / m^2 of its gradient Gram P)."""
    from ..curvature.losses import per_sample_losses

    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        outputs = forward_fn(model, inputs) if forward_fn is not None else model(inputs)
        mean = per_sample_losses(loss, outputs, targets).mean()
        grads = torch.autograd.grad(mean, params, allow_unused=True)
    return float(sum(g.double().square().sum() for g in grads if g is not None))


def _warn(message: str, category: type[Warning] = CoherenceWarning) -> None:
    warnings.warn(message, category, stacklevel=3)
