"""The probe shared by :class:`~torch_coherence.CoherenceMonitor` and the Lightning callback.

:class:`CoherenceProbe` owns everything the two integrations have in common:

* the schedule: a count of optimizer steps actually taken (observed through a step hook on
  the optimizer, or counted by the caller), not a trainer's batch or ``global_step`` counter,
  with an optional time budget (``max_overhead``) that stretches the interval so that the
  probe takes at most that fraction of the training time;
* the probe batch: fixed and seeded, from explicit tensors, a dataset or a data loader;
* the call into the curvature engine (:func:`torch_coherence.measure_curvature`), with the
  model's parameters, buffers, gradients, RNG and train/eval modes restored afterwards;
* the stability report (:func:`torch_coherence.stability_report`) for the learning rate,
  momentum and weight decay read from the optimizer's param groups, SAM's ``rho`` (and its
  normaliser alpha, the gradient norm, measured on the probe), the batch size and the
  data-set size;
* the metrics (one flat dict with fixed tag names), the warnings with hysteresis, the action
  on instability and the history that ``state_dict`` saves.

The integrations only decide *when* to call :meth:`CoherenceProbe.measure` and
:meth:`CoherenceProbe.commit`, how to reach the optimizer and where to send metrics.

Everything "unstable" here means what the theory proves: **mean-square divergence of the
linearized dynamics** (E||w_k||^2 grows without bound near the current weights).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .theory import StabilityReport, stability_report

__all__ = [
    "ON_UNSTABLE",
    "SHARED_OPTIONS",
    "TAGS",
    "CoherenceProbe",
    "CoherenceProbeError",
    "BlowupWarning",
    "CoherenceWarning",
    "LinearInstabilityWarning",
    "ProbeResult",
    "TAG_DESCRIPTIONS",
    "UnstableTrainingError",
    "effective_optimizer_params",
]

#: The actions ``on_unstable`` accepts.
ON_UNSTABLE = ("warn", "raise", "stop", "adjust_lr")

#: What "unstable" means for the warnings and the ``on_unstable`` actions (``criterion``):
#: ``"typical"``, the top Lyapunov exponent gamma > 0 (a typical run of the linearized
#: dynamics diverges: training blows up); ``"mean_square"``, rho(T) > 1 (E||w||^2 diverges,
#: fluctuations grow without bound, although most runs may still settle); ``"theorem1"``,
#: the margin of paper 000's Theorem 1 (or the GD condition) above 1, a sufficient
#: condition of mean-square divergence that needs no dynamics computation. Always
#: theorem1 => mean_square and typical => mean_square (gamma <= log rho(T) / 2); neither
#: of theorem1 and typical implies the other.
CRITERIA = ("typical", "mean_square", "theorem1")

#: Probe examples (the first ones) on which gamma and the typical critical learning rate
#: are computed, and the Monte-Carlo settings (:func:`torch_coherence.lyapunov_exponent`):
#: on the digits MLP (64 examples, C = 10) gamma costs 0.1 s and the typical critical
#: learning rate 1.0 s on one CPU thread, against 0.03 s for the curvature itself.
LYAPUNOV_SAMPLES = 64
LYAPUNOV_SETTINGS = {"steps": 200, "repeats": 4}
TYPICAL_LR_REL_TOL = 2e-2
#: Assumed cost of the Lyapunov part before it has been timed once (seconds). It runs only
#: when it fits in the ``max_overhead`` budget (always with ``max_overhead=None``).
LYAPUNOV_FIRST_SECONDS = 1.0

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

#: Every metric tag a probe can log, in logging order. ``stability/mean_square_rate`` is
#: present only with ``mean_square_rate=True``, the three Lyapunov tags only with
#: ``lyapunov=True`` and the probe's Gram available, ``sharpness/hessian`` only when the
#: engine computed the Hessian sharpness.
TAGS = (
    "coherence/sigma",
    "coherence/lambda_S",
    "coherence/max_sample_sharpness",
    "sharpness/hessian",
    "sharpness/ggn",
    "stability/gd_threshold",
    "stability/theorem1_threshold",
    "stability/theorem2_bound",
    "stability/margin",
    "stability/critical_lr",
    "stability/critical_batch_size",
    "stability/mean_square_rate",
    "stability/lyapunov",
    "stability/lyapunov_stderr",
    "stability/typical_critical_lr",
    "noise/gradient_noise_scale",
    "probe/seconds",
)

#: One sentence per tag, shown by TensorBoard (summary metadata) and in the docs.
TAG_DESCRIPTIONS: dict[str, str] = {
    "coherence/sigma": "Hessian coherence sigma = lambda_1(S) / max_i lambda_1(H_i)",
    "coherence/lambda_S": "top eigenvalue of the coherence matrix S_ij = sqrt(tr(H_i H_j))",
    "coherence/max_sample_sharpness": "max_i lambda_1(H_i) over the probe examples",
    "sharpness/hessian": "top eigenvalue of the Hessian of the training loss",
    "sharpness/ggn": "top eigenvalue of the Gauss-Newton matrix of the training loss",
    "stability/gd_threshold": "2 (1 + momentum) / lr: full-batch gradient descent's bound",
    "stability/theorem1_threshold": "sharpness above which Theorem 1 proves mean-square divergence",
    "stability/theorem2_bound": "sharpness below which some Hessians with this sigma converge",
    "stability/margin": "sharpness / Theorem 1 threshold (1: the boundary)",
    "stability/critical_lr": "learning rate at which Theorem 1's margin reaches 1",
    "stability/critical_batch_size": "batch size below which Theorem 1 proves divergence",
    "stability/mean_square_rate": "rho(T): spectral radius of the linearized second-moment map",
    "stability/lyapunov": "gamma: top Lyapunov exponent of the linearized dynamics (per step)",
    "stability/lyapunov_stderr": "standard error of gamma",
    "stability/typical_critical_lr": "learning rate at which gamma crosses 0",
    "noise/gradient_noise_scale": "B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018)",
    "probe/seconds": "wall time of the probe (seconds)",
}


class CoherenceWarning(UserWarning):
    """Category of every warning the probe emits (filter it with :mod:`warnings`)."""


class BlowupWarning(CoherenceWarning):
    """A blow-up of training is predicted, by the criterion validated on real runs.

    Only this category says that training will blow up (``docs/warnings.md`` gives the
    recall and false alarms measured behind it).
    """


class LinearInstabilityWarning(CoherenceWarning):
    """The linearized dynamics at these weights are unstable.

    Expect a loss spike or a move to flatter weights, not necessarily divergence.
    """


class UnstableTrainingError(RuntimeError):
    """Raised with ``on_unstable="raise"`` when the margin crosses 1.

    Attributes:
        report: the :class:`~torch_coherence.StabilityReport` that crossed.
        step: the optimizer-step count at the probe.
    """

    def __init__(self, message: str, report: StabilityReport | None, step: int) -> None:
        super().__init__(message)
        self.report = report
        self.step = step


class CoherenceProbeError(RuntimeError):
    """Raised with ``on_unstable="raise"`` when the probe itself fails."""


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: small and picklable (it is broadcast under DDP).

    Attributes:
        step: optimizer-step count at which the probe ran.
        metrics: tag -> value (see :data:`TAGS`); empty when the probe failed.
        report: the stability report, or ``None`` when the probe failed.
        error: a one-line description of the failure, or ``None``.
        messages: warnings to emit at this probe (after hysteresis).
        armed: the hysteresis state after this probe: (warn at margin_warning, warn when
            unstable by the criterion, note when only the mean-square notion fails).
        stop: whether training should stop.
        new_lr: the learning rate set by ``on_unstable="adjust_lr"``, else ``None``.
        raise_error: whether :meth:`CoherenceProbe.commit` raises.
        next_step: the optimizer-step count at which the next probe is due.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: StabilityReport | None = None
    error: str | None = None
    messages: tuple[str, ...] = ()
    armed: tuple[bool, bool, bool] = (True, True, True)
    stop: bool = False
    new_lr: float | None = None
    raise_error: bool = False
    next_step: int = 0


def shared_options(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SHARED_OPTIONS` entries of ``values`` (an integration's ``locals()``)."""
    return {name: values[name] for name in SHARED_OPTIONS}


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a Lightning wrapper."""
    return getattr(optimizer, "_optimizer", optimizer)


def effective_optimizer_params(optimizer: Any) -> dict[str, float | None]:
    """Learning rate, momentum, weight decay and SAM radius from the param groups.

    With several groups the largest learning rate is used (the most unstable direction
    decides), and the momentum and weight decay of that group. SAM (any optimizer with a
    ``base_optimizer`` and a ``rho`` in its groups) contributes ``rho``.

    Args:
        optimizer: a :class:`torch.optim.Optimizer` (or Lightning's wrapper of one).

    Returns:
        ``{"lr", "momentum", "weight_decay", "sam_rho"}`` (``sam_rho`` is ``None`` without SAM).
    """
    opt = _unwrap(optimizer)
    groups = [g for g in opt.param_groups if "lr" in g]
    if not groups:
        raise ValueError("optimizer has no param group with a learning rate 'lr'")
    group = max(groups, key=lambda g: float(g["lr"]))
    momentum = group.get("momentum", 0.0)
    if momentum is None:
        momentum = 0.0
    rho = group.get("rho") if hasattr(opt, "base_optimizer") else None
    return {
        "lr": float(group["lr"]),
        "momentum": float(momentum),
        "weight_decay": float(group.get("weight_decay", 0.0) or 0.0),
        "sam_rho": None if rho is None else float(rho),
    }


def _count_target(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` runs exactly once per training step (SAM: its base)."""
    opt = _unwrap(optimizer)
    return getattr(opt, "base_optimizer", opt)


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


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def _fmt_b(b: float) -> str:
    if math.isinf(b):
        return "inf"
    return f"{b:.0f}" if b >= 10 or float(b).is_integer() else f"{b:.2g}"


def _default_engine(*args: Any, **kwargs: Any) -> Any:
    from .curvature import measure_curvature

    return measure_curvature(*args, **kwargs)


def _preserved(model: nn.Module) -> Any:
    from ._state import preserved_state

    return preserved_state(model)


class CoherenceProbe:
    """Schedule, measurement, report, warnings and history of the coherence probe.

    Args:
        loss: the training loss as the engine accepts it (e.g. ``nn.CrossEntropyLoss()``,
            ``nn.MSELoss()``); may be set later through :attr:`loss`.
        probe: explicit probe data: an ``(inputs, targets)`` pair of tensors, a dataset of
            ``(input, target)`` samples or a data loader (its dataset is sampled; the loader
            is never iterated, so its shuffling RNG is untouched). ``None``: supplied later
            with :meth:`set_probe` (the Lightning callback samples the training set).
        probe_size: number of examples drawn (seeded, without replacement) from a dataset or
            loader; explicit tensors are used whole.
        dataset_size: n, the size of the training set the numbers refer to; may be set later.
        every_n_steps: probe every this many optimizer steps (at least; see ``max_overhead``).
        max_overhead: time budget: after each probe the next one is postponed (beyond
            ``every_n_steps``) until the probes' total wall time, the next one included at
            the last one's cost, is at most this fraction of the training time measured
            since the first step. ``None``: a fixed schedule every ``every_n_steps`` steps.
            The first probe always runs at step ``every_n_steps``. The default 1% leaves
            room, under the 3% target of ``docs/overhead.md``, for that first probe and
            for Lightning's dispatch of a callback's hooks (about 10 microseconds a step,
            1-2% of the digits models' steps).
        on_unstable: ``"warn"``, ``"raise"`` (:class:`UnstableTrainingError`; a failing probe
            raises :class:`CoherenceProbeError`), ``"stop"`` or ``"adjust_lr"``.
        margin_warning: warn once when the margin first reaches this value (0 < x < 1);
            ``None`` warns only at 1.
        lr_safety: ``"adjust_lr"`` sets the learning rate to this fraction of the critical one.
        sharpness: which sharpness the engine computes besides the Gram matrix
            (``"both"``, ``"hessian"``, ``"ggn"`` or ``None``: the GGN sharpness of the probe's
            Gram only, the cheapest).
        seed: seed of the probe-batch draw and of the engine.
        mean_square_rate: also log rho(T), the exact mean-square rate of the linearized
            dynamics (with the optimizer's momentum and SAM's rho and normaliser, as in the
            report), when :mod:`torch_coherence.dynamics` is available; the engine then
            returns the whole block Gram, (m R)^2 doubles. Implied by
            ``criterion="mean_square"``.
        lyapunov: also compute gamma, the top Lyapunov exponent of the linearized dynamics
            (``stability/lyapunov`` and its standard error), and the typical critical
            learning rate where gamma crosses 0 (``stability/typical_critical_lr``), on the
            first :data:`LYAPUNOV_SAMPLES` probe examples standing for the n training
            examples, with the optimizer's momentum and SAM's rho (see
            :data:`LYAPUNOV_SETTINGS`). It costs about 1 s (64 examples, 10 classes, one
            CPU thread), far more than the curvature of a small model, so it runs only when
            it fits in the ``max_overhead`` budget (first assumed
            :data:`LYAPUNOV_FIRST_SECONDS`, then the last measured cost); with
            ``max_overhead=None`` at every probe. Until it fits, probes use Theorem 1
            (their warnings name the criterion used), without a note. Needs the probe's
            block Gram, which the engine
            returns when m R <= 1024 (R: output dimension, e.g. classes); for larger probes
            pass ``engine_kwargs={"return_gram": True}`` or gamma is skipped (with a note).
        criterion: what counts as unstable for the warnings and ``on_unstable``: one of
            :data:`CRITERIA`. Default ``"typical"``: act when training is expected to blow
            up (gamma > 0), and say so separately, once per crossing, when only the
            mean-square notion fails (Theorem 1's margin above 1 while gamma < 0:
            "fluctuations grow without bound although most runs still settle"). When gamma
            is not available the probe falls back to ``"theorem1"`` (with a note). The
            approaching warning (``margin_warning``) uses lr / typical critical lr for
            ``"typical"`` and Theorem 1's margin otherwise; ``"adjust_lr"`` lowers the
            learning rate to ``lr_safety`` x the typical critical one for ``"typical"`` and
            x Theorem 1's critical one otherwise. Theorem 1 is only sufficient: the exact
            mean-square critical learning rate (:func:`torch_coherence.critical_lr_exact`,
            too costly per probe) can be below it (measured 1.89 against 2.02 on a small
            MLP), which the default ``lr_safety=0.5`` covers there but does not guarantee.
        forward_fn: ``forward_fn(model, inputs) -> outputs`` when ``model(inputs)`` is not the
            forward pass the loss expects.
        engine_kwargs: further keyword arguments for :func:`torch_coherence.measure_curvature`.
        engine: the measuring function (default :func:`torch_coherence.measure_curvature`).

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
        max_overhead: float | None = 0.01,
        on_unstable: str = "warn",
        margin_warning: float | None = 0.8,
        lr_safety: float = 0.5,
        sharpness: str | None = None,
        seed: int = 0,
        mean_square_rate: bool = False,
        lyapunov: bool = True,
        criterion: str = "typical",
        forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        engine: Callable[..., Any] | None = None,
    ) -> None:
        self.every_n_steps = _check_int("every_n_steps", every_n_steps, 1)
        if max_overhead is not None:
            _check_fraction("max_overhead", max_overhead, upper_open=True)
        self.max_overhead = max_overhead
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
        if not isinstance(lyapunov, bool):
            raise ValueError(f"lyapunov must be a bool, got {lyapunov!r}")
        if criterion == "typical" and not lyapunov:
            raise ValueError(
                "criterion='typical' needs lyapunov=True (gamma is the typical criterion); "
                "pass criterion='theorem1' or 'mean_square' to switch gamma off"
            )
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError("forward_fn must be callable or None")
        if engine_kwargs is not None and not isinstance(engine_kwargs, dict):
            raise ValueError(f"engine_kwargs must be a dict, got {type(engine_kwargs).__name__}")
        self.loss = loss
        self.dataset_size = dataset_size
        self.on_unstable = on_unstable
        self.margin_warning = margin_warning
        self.lr_safety = _check_fraction("lr_safety", lr_safety)
        self.sharpness = sharpness
        self.seed = seed
        self.mean_square_rate = bool(mean_square_rate) or criterion == "mean_square"
        self.lyapunov = lyapunov
        self.criterion = criterion
        self._noted_lyapunov = False
        self._lyapunov_seconds = LYAPUNOV_FIRST_SECONDS
        self._lyapunov_skip: str | None = None  # why gamma was skipped: "gram" or "budget"
        self._last_used: str | None = None
        self.forward_fn = forward_fn
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine = engine or _default_engine
        self._batch: tuple[Any, Any] | None = None
        self._device_batch: tuple[Any, Any, torch.device] | None = None
        self.steps = 0
        self.last_probe_step = 0
        self.next_probe_step = self.every_n_steps
        self.probe_seconds = 0.0
        self._t0: float | None = None
        self._t0_steps = 0
        self.armed = (True, True, True)
        self.history: list[dict[str, Any]] = []
        self.last_curvature: Any = None
        self.last_report: StabilityReport | None = None
        self._warm_vector: torch.Tensor | None = None
        self._hook: Any = None
        self._noted_optimizer = False
        if probe is not None:
            self.set_probe(probe)

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
        """Fix the probe batch from tensors, a dataset or a data loader (see the class doc)."""
        if isinstance(probe, (tuple, list)) and len(probe) == 2 and _is_batch_like(probe[0]):
            inputs, targets = probe
            if _length(inputs) < 1 or _length(inputs) != _length(targets):
                raise ValueError(
                    "probe must be an (inputs, targets) pair with the same, non-zero number "
                    f"of examples, got {_length(inputs)} and {_length(targets)}"
                )
            self._batch = (_detach(inputs), _detach(targets))
        else:
            dataset = getattr(probe, "dataset", probe)
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise ValueError(
                    "probe must be an (inputs, targets) pair of tensors, a map-style dataset or "
                    f"a DataLoader over one, got {type(probe).__name__}"
                )
            self._batch = sample_probe(dataset, self.probe_size, self.seed)
        self._device_batch = None

    def _batch_on(self, device: torch.device) -> tuple[Any, Any]:
        assert self._batch is not None
        if self._device_batch is None or self._device_batch[2] != device:
            x, y = self._batch
            self._device_batch = (_to(x, device), _to(y, device), device)
        return self._device_batch[0], self._device_batch[1]

    # ------------------------------------------------------------------ schedule
    def attach(self, optimizer: Any) -> None:
        """Count the optimizer's steps with a post-step hook (SAM: its base optimizer's)."""
        self.detach()
        target = _count_target(optimizer)
        self._hook = target.register_step_post_hook(self._on_step)

    def detach(self) -> None:
        """Remove the step hook installed by :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_step(self, *_: Any) -> None:
        self.count_step()

    def count_step(self) -> None:
        """Count one optimizer step (the hook of :meth:`attach` calls this)."""
        if self._t0 is None:
            self._t0, self._t0_steps = time.perf_counter(), self.steps
        self.steps += 1

    def start(self) -> None:
        """A fit starts or resumes: the next :meth:`due` is true (the pre-flight probe).

        Call it once at fit start and at resume, before the first optimizer step, so that
        the weights are judged at the current learning rate and batch size before anything
        can blow up.
        """
        self.next_probe_step = self.steps

    def observe(self, loss: float | None = None, lr: float | None = None) -> bool:
        """Per-step guard on what the loop already computed; whether it triggered a probe.

        Args:
            loss: the training loss of the step just taken (a float or a 0-d tensor).
            lr: the optimizer's current (largest) learning rate.
        """
        value = float(loss) if loss is not None else math.nan
        if loss is not None and not math.isfinite(value):
            self.next_probe_step = self.steps
            return True
        return False

    def due(self) -> bool:
        """Whether the step count has reached the next scheduled probe."""
        return self.steps >= self.next_probe_step

    def _training_seconds(self) -> float:
        """Wall time since the first counted step, less the time spent probing."""
        if self._t0 is None:
            return 0.0
        return time.perf_counter() - self._t0 - self.probe_seconds

    def affordable(self, seconds: float) -> bool:
        """Whether ``seconds`` more diagnostic work keeps within the ``max_overhead`` budget.

        Always true without a budget. The integrations ask this before optional extras
        (the phase-plane figure) and then :meth:`charge` what they spent.
        """
        if self.max_overhead is None:
            return True
        return self.probe_seconds + seconds <= self.max_overhead * self._training_seconds()

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of other diagnostic work (a figure) against the time budget."""
        self.probe_seconds += max(float(seconds), 0.0)

    def _next_step(self, step: int, cost: float) -> int:
        """Where the next probe goes: the fixed grid, stretched by the time budget."""
        fixed = (step // self.every_n_steps + 1) * self.every_n_steps
        if self.max_overhead is None or self._t0 is None:
            return fixed
        train = self._training_seconds()
        steps = max(step - self._t0_steps, 1)
        per_step = max(train, 1e-9) / steps
        needed = (self.probe_seconds + cost) / self.max_overhead - train
        return max(fixed, step + math.ceil(max(needed, 0.0) / per_step))

    # ------------------------------------------------------------------ measurement
    def measure(self, model: nn.Module, optimizer: Any, batch_size: float) -> ProbeResult:
        """Run the engine on the probe batch and decide warnings and actions.

        Pure with respect to the probe's own state (nothing is recorded until
        :meth:`commit`) and to the model (its state is restored bit-identically).

        Args:
            model: the network (its ``forward`` or :attr:`forward_fn` gives the outputs).
            optimizer: where learning rate, momentum, weight decay and SAM's rho are read.
            batch_size: the effective batch size B of one optimizer step (all devices and
                accumulated micro-batches together).
        """
        step = self.steps
        if self._batch is None:
            raise ValueError("the probe batch is not set: pass probe= or call set_probe()")
        if self.loss is None:
            raise ValueError("loss is not set: pass loss= (e.g. torch.nn.CrossEntropyLoss())")
        if self.dataset_size is None:
            raise ValueError("dataset_size is not set: pass dataset_size= (n, the train size)")
        start = time.perf_counter()
        try:
            hyper = effective_optimizer_params(optimizer)
            report, metrics = self._measure(model, hyper, batch_size)
        except Exception as err:  # any failure of a diagnostic is reported
            cost = time.perf_counter() - start
            self.probe_seconds += cost
            return self._failed(step, err, self._next_step(step, cost))
        cost = time.perf_counter() - start
        self.probe_seconds += cost
        metrics["probe/seconds"] = cost
        messages, armed, stop, new_lr, raise_error = self._decide(step, report, metrics)
        note = self._optimizer_note(optimizer)
        if note:
            messages = (note, *messages)
        return ProbeResult(
            step=step,
            metrics=metrics,
            report=report,
            messages=messages,
            armed=armed,
            stop=stop,
            new_lr=new_lr,
            raise_error=raise_error,
            next_step=self._next_step(step, cost + self._budget_extra()),
        )

    def _measure(
        self, model: nn.Module, hyper: dict[str, float | None], batch_size: float
    ) -> tuple[StabilityReport, dict[str, float]]:
        n = int(self.dataset_size)  # type: ignore[arg-type]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        inputs, targets = self._batch_on(device)
        m = _length(inputs)
        kwargs = dict(self.engine_kwargs)
        kwargs.setdefault("sharpness", self.sharpness)
        kwargs.setdefault("seed", self.seed)
        if self.forward_fn is not None:
            kwargs.setdefault("forward_fn", self.forward_fn)
        if self._warm_vector is not None and kwargs["sharpness"] is not None:
            kwargs.setdefault("init_vector", self._warm_vector)
        if self.mean_square_rate:
            kwargs.setdefault("return_gram", True)  # rho(T) needs K even when m R > 1024
        probe_grad_sq = None
        with _preserved(model):
            curv = self._engine(model, inputs, targets, self.loss, n=n, **kwargs)
            if hyper["sam_rho"] is not None:
                probe_grad_sq = _mean_gradient_sq_norm(
                    model, inputs, targets, self.loss, self.forward_fn
                )
        self.last_curvature = curv
        warm = getattr(curv, "sharpness_vector", None)
        self._warm_vector = warm if isinstance(warm, torch.Tensor) else None

        stats = curv.stats
        sigma = _full_data_sigma(curv)
        ggn = _first_finite(getattr(curv, "ggn_sharpness", None), stats.sharpness)
        hessian = getattr(curv, "hessian_sharpness", None)
        for name, value in (("sigma", sigma), ("GGN sharpness", ggn)):
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite {name} ({value}) from the probe batch")
        # Weight decay wd adds wd * I to the Hessian of the regularised loss.
        sharp = max(ggn, 0.0) + float(hyper["weight_decay"] or 0.0)
        b = min(max(float(batch_size), 1.0), float(n))
        momentum = min(float(hyper["momentum"] or 0.0), 0.999999)
        sam_alpha = 1.0
        if probe_grad_sq is not None:
            sam_alpha = _sam_alpha(probe_grad_sq, getattr(curv, "gradient_noise_scale", None), m)
        report = stability_report(
            sharp,
            max(sigma, 1.0),
            float(hyper["lr"]),  # type: ignore[arg-type]
            b,
            n,
            momentum=momentum,
            sam_rho=hyper["sam_rho"],
            sam_alpha=sam_alpha,
        )
        metrics: dict[str, float] = {
            "coherence/sigma": float(sigma),
            "coherence/lambda_S": float(stats.lambda_S),
            "coherence/max_sample_sharpness": float(stats.max_sample_sharpness),
        }
        if hessian is not None and math.isfinite(float(hessian)):
            metrics["sharpness/hessian"] = float(hessian)
        metrics["sharpness/ggn"] = float(ggn)
        metrics.update(
            {
                "stability/gd_threshold": report.gd_threshold,
                "stability/theorem1_threshold": report.theorem1_threshold,
                "stability/theorem2_bound": report.theorem2_bound,
                "stability/margin": report.margin,
                "stability/critical_lr": report.critical_lr,
                "stability/critical_batch_size": report.critical_batch_size,
            }
        )
        if self.mean_square_rate:
            rate = _mean_square_rate(curv, report.lr, b, n, momentum, hyper["sam_rho"], sam_alpha)
            if rate is not None:
                metrics["stability/mean_square_rate"] = rate
        self._lyapunov_skip = None
        if self.lyapunov:
            if getattr(curv, "gram", None) is None:
                self._lyapunov_skip = "gram"
            elif not self.affordable(self._lyapunov_seconds):
                self._lyapunov_skip = "budget"
            else:
                t0 = time.perf_counter()
                metrics.update(
                    _lyapunov_metrics(
                        curv, report.lr, b, n, momentum, hyper["sam_rho"], sam_alpha, self.seed
                    )
                )
                self._lyapunov_seconds = time.perf_counter() - t0
        gns = getattr(curv, "gradient_noise_scale", None)
        if gns is not None and math.isfinite(float(gns)):
            metrics["noise/gradient_noise_scale"] = float(gns)
        return report, metrics

    def _budget_extra(self) -> float:
        """Seconds the next probe needs beyond this one's: the Lyapunov part it skipped.

        Without this the budget schedule would place the next probe where only the
        curvature's cost fits, and gamma would never be computed.
        """
        if self._lyapunov_skip == "budget":
            return self._lyapunov_seconds
        return 0.0

    def _optimizer_note(self, optimizer: Any) -> str | None:
        """A one-time note when the optimizer is not SGD (or SAM over SGD)."""
        base = _count_target(optimizer)
        if self._noted_optimizer or isinstance(base, torch.optim.SGD):
            return None
        self._noted_optimizer = True
        return (
            f"torch-coherence: the stability thresholds are derived for SGD (and SAM over SGD); "
            f"with {type(base).__name__} they describe SGD at the same learning rate, batch "
            "size and momentum, not the adaptive update"
        )

    def _failed(self, step: int, err: BaseException, next_step: int) -> ProbeResult:
        what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        raising = self.on_unstable == "raise"
        tail = "" if raising else "; training continues"
        msg = f"torch-coherence: the coherence probe at optimizer step {step} failed ({what}){tail}"
        return ProbeResult(
            step=step,
            error=msg,
            messages=(msg,),
            armed=self.armed,
            raise_error=raising,
            next_step=next_step,
        )

    def _verdict(
        self, report: StabilityReport, metrics: dict[str, float]
    ) -> tuple[str, bool, float, float]:
        """(criterion used, unstable by it, its margin, its critical learning rate)."""
        gamma = metrics.get("stability/lyapunov")
        typical_lr = metrics.get("stability/typical_critical_lr")
        if self.criterion == "typical" and gamma is not None:
            se = metrics.get("stability/lyapunov_stderr", 0.0)
            margin = report.lr / typical_lr if typical_lr else math.nan
            crit = typical_lr if typical_lr else math.nan
            return "typical", gamma - 2.0 * se > 0, margin, crit
        rate = metrics.get("stability/mean_square_rate")
        if self.criterion == "mean_square" and rate is not None:
            return "mean_square", rate > 1.0, report.margin, report.critical_lr
        return "theorem1", report.unstable, report.margin, report.critical_lr

    def _decide(
        self, step: int, report: StabilityReport, metrics: dict[str, float]
    ) -> tuple[tuple[str, ...], tuple[bool, bool, bool], bool, float | None, bool]:
        """Hysteresis: warn once per upward crossing of margin_warning and of instability."""
        warn_armed, unstable_armed, note_armed = self.armed
        used, unstable, margin, crit = self._verdict(report, metrics)
        # a probe judged by another criterion than the last (gamma skipped for the time
        # budget) may disarm but not re-arm: no repeated warning or action from flipping
        same = self._last_used in (None, used)
        self._last_used = used
        messages: list[str] = []
        # a missing Gram is a configuration matter: said once; waiting for the time budget
        # is the normal start of every fit: silent (documented under ``lyapunov``)
        waiting = self._lyapunov_skip == "budget"
        if used != self.criterion and not waiting and not self._noted_lyapunov:
            self._noted_lyapunov = True
            what = "gamma" if self.criterion == "typical" else "rho(T)"
            messages.append(
                f"torch-coherence (optimizer step {step}): criterion={self.criterion!r} needs "
                f"{what}, which this probe did not compute: the probe's block Gram is not "
                "available (probe size x outputs > 1024; pass engine_kwargs={'return_gram': "
                "True} or a smaller probe_size). Probes without it use Theorem 1 (said once)."
            )
        if self.margin_warning is not None and math.isfinite(margin):
            if self.margin_warning <= margin <= 1 and not unstable and warn_armed:
                messages.append(self.approaching_message(step, report, used, margin, crit))
                warn_armed = False
            elif margin < self.margin_warning and same:
                warn_armed = True
        # the mean-square-only case, said once per crossing, when gamma is the criterion
        rate = metrics.get("stability/mean_square_rate")
        ms_fails = report.unstable or (rate is not None and rate > 1.0)
        if used == "typical" and not unstable and ms_fails and note_armed:
            messages.append(self.mean_square_message(step, report, metrics))
            note_armed = False
        elif not ms_fails:
            note_armed = True
        stop, new_lr, raise_error = False, None, False
        if unstable:
            if unstable_armed:
                messages.append(self.unstable_message(step, report, used, metrics, crit))
                unstable_armed = False
                warn_armed = False
            if self.on_unstable == "stop":
                stop = True
            elif self.on_unstable == "raise":
                raise_error = True
            elif self.on_unstable == "adjust_lr":
                if not math.isfinite(crit):  # e.g. the typical critical lr was not found
                    used, crit = "theorem1", report.critical_lr
                # never raise the learning rate (rho(T) > 1 can hold below Theorem 1's)
                new_lr = self.lr_safety * min(crit, report.lr)
                messages.append(
                    f"torch-coherence: on_unstable='adjust_lr' lowered the learning rate from "
                    f"{_fmt(report.lr)} to {_fmt(new_lr)} ({self.lr_safety:g} x the "
                    f"{_CRIT_NAMES[used]} critical {_fmt(crit)}) at optimizer step {step}"
                )
        elif same:
            unstable_armed = True
        return tuple(messages), (warn_armed, unstable_armed, note_armed), stop, new_lr, raise_error

    # ------------------------------------------------------------------ messages
    @staticmethod
    def _fix(report: StabilityReport) -> str:
        if math.isinf(report.critical_batch_size):
            return (
                f"lower it below {_fmt(report.critical_lr)} (no batch size helps: even "
                "full-batch gradient descent diverges at this learning rate)"
            )
        return f"lower it or raise the batch size above {_fmt_b(report.critical_batch_size)}"

    def unstable_message(
        self,
        step: int,
        report: StabilityReport,
        criterion: str = "theorem1",
        metrics: dict[str, float] | None = None,
        critical_lr: float | None = None,
    ) -> str:
        """The warning when the criterion first says unstable (which one, numbers, the fix)."""
        metrics = metrics or {}
        head = f"torch-coherence (optimizer step {step}, criterion {criterion!r}): "
        numbers = f"Sharpness {_fmt(report.sharpness)}, sigma {_fmt(report.sigma)}, n = {report.n}"
        if criterion == "typical":
            gamma = metrics.get("stability/lyapunov", math.nan)
            crit = critical_lr if critical_lr is not None else math.nan
            where = (
                f"learning rate {_fmt(report.lr)} is above the typical critical {_fmt(crit)} "
                f"for batch size {_fmt_b(report.batch_size)}: lower it below {_fmt(crit)}"
                if math.isfinite(crit)
                else f"learning rate {_fmt(report.lr)}: lower it"
            )
            return (
                head + f"typically unstable: training will diverge (top Lyapunov exponent "
                f"gamma = {gamma:+.3g} per step > 0: a typical run of the linearized dynamics "
                f"grows); {where}. {numbers}."
            )
        if criterion == "mean_square":
            rate = metrics.get("stability/mean_square_rate", math.nan)
            return (
                head + f"mean-square unstable: fluctuations grow without bound (rho(T) = "
                f"{rate:.4g} > 1: E||w_k||^2 of the linearized dynamics diverges), although "
                f"most runs may still settle. Learning rate {_fmt(report.lr)}, batch size "
                f"{_fmt_b(report.batch_size)}: lower it well below Theorem 1's critical "
                f"learning rate {_fmt(report.critical_lr)}, an upper bound of the exact one. "
                f"{numbers}."
            )
        return (
            head + f"learning rate {_fmt(report.lr)} is above the critical "
            f"{_fmt(report.critical_lr)} for batch size {_fmt_b(report.batch_size)}"
            f": {self._fix(report)}. {numbers}, margin {report.margin:.2f}: Theorem 1 "
            "guarantees mean-square divergence of the linearized dynamics (fluctuations grow "
            "without bound; whether a typical run diverges is criterion='typical')."
        )

    def mean_square_message(
        self, step: int, report: StabilityReport, metrics: dict[str, float]
    ) -> str:
        """Theorem 1 fires but gamma < 0: the mean-square-only case, explained."""
        gamma = metrics.get("stability/lyapunov", math.nan)
        se = metrics.get("stability/lyapunov_stderr", 0.0)
        typical = metrics.get("stability/typical_critical_lr", math.nan)
        sign = (
            "is negative: a typical run still contracts"
            if gamma < 0
            else f"is not significantly positive (+- {se:.2g}): a typical run barely grows"
        )
        return (
            f"torch-coherence (optimizer step {step}): mean-square unstable: fluctuations grow "
            f"without bound although most runs still settle. Learning rate {_fmt(report.lr)}, "
            f"batch size {_fmt_b(report.batch_size)}: {_ms_evidence(report, metrics)}, but "
            "the top Lyapunov "
            f"exponent gamma = {gamma:+.3g} per step {sign}, up to the typical critical "
            f"learning rate {_fmt(typical)}. Expect "
            "rare large loss spikes; criterion='typical' acts only above it."
        )

    def approaching_message(
        self,
        step: int,
        report: StabilityReport,
        criterion: str = "theorem1",
        margin: float | None = None,
        critical_lr: float | None = None,
    ) -> str:
        """The warning at an upward crossing of ``margin_warning``."""
        margin = report.margin if margin is None else margin
        crit = report.critical_lr if critical_lr is None else critical_lr
        what = (
            "a typical run diverges (training blows up)"
            if criterion == "typical"
            else "the theory guarantees mean-square divergence of the linearized dynamics"
        )
        fix = f"lower it below {_fmt(crit)}" if criterion == "typical" else self._fix(report)
        return (
            f"torch-coherence (optimizer step {step}, criterion {criterion!r}): stability "
            f"margin {margin:.2f} reached {self.margin_warning:g}: learning rate "
            f"{_fmt(report.lr)} is close to the {_CRIT_NAMES[criterion]} critical {_fmt(crit)} "
            f"for batch size {_fmt_b(report.batch_size)}, above which {what}; to keep a "
            f"safety margin, {fix}."
        )

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        result: ProbeResult,
        optimizer: Any = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """Record a result: history, hysteresis, warnings, learning-rate change, raise.

        Under DDP every rank commits the same (broadcast) result, so the state and the
        actions stay consistent across ranks.

        Args:
            result: from :meth:`measure`.
            optimizer: whose learning rate ``"adjust_lr"`` lowers.
            warn: ``warn(text, category)`` emits one warning (default :func:`warnings.warn`);
                ``category`` is :class:`CoherenceWarning` or a subclass
                (:class:`BlowupWarning`, :class:`LinearInstabilityWarning`).
        """
        self.last_probe_step = result.step
        self.next_probe_step = max(result.next_step, result.step + 1)
        self.armed = result.armed
        if result.report is not None:
            self.last_report = result.report
        entry: dict[str, Any] = {"step": result.step, **result.metrics}
        if result.error is not None:
            entry["error"] = result.error
        if result.messages:
            entry["warnings"] = list(result.messages)
        if result.report is not None:
            entry["lr"] = result.report.lr
            entry["batch_size"] = result.report.batch_size
        self.history.append(entry)
        emit = warn or _warn
        for msg in result.messages:
            emit(msg, CoherenceWarning)
        if result.new_lr is not None and optimizer is not None:
            set_learning_rate(optimizer, result.new_lr)
        if result.raise_error:
            if result.error is not None:
                raise CoherenceProbeError(result.error)
            msg = result.messages[0] if result.messages else "unstable"
            raise UnstableTrainingError(msg, result.report, result.step)

    def run(
        self,
        model: nn.Module,
        optimizer: Any,
        batch_size: float,
        warn: Callable[[str], None] | None = None,
    ) -> ProbeResult:
        """:meth:`measure` then :meth:`commit` (single process)."""
        result = self.measure(model, optimizer, batch_size)
        self.commit(result, optimizer, warn)
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """History, step count and warning state (the probe batch is re-drawn from the seed)."""
        return {
            "steps": self.steps,
            "last_probe_step": self.last_probe_step,
            "next_probe_step": self.next_probe_step,
            "armed": list(self.armed),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, so that the curves continue."""
        self.steps = int(state["steps"])
        self.last_probe_step = int(state["last_probe_step"])
        self.next_probe_step = int(state.get("next_probe_step", self.steps + 1))
        armed = [bool(a) for a in state["armed"]]
        self.armed = (armed[0], armed[1], armed[2] if len(armed) > 2 else True)
        self.history = [dict(h) for h in state["history"]]


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Scale every group's learning rate so that the largest becomes ``lr``."""
    opt = _unwrap(optimizer)
    top = max(float(g["lr"]) for g in opt.param_groups)
    for group in opt.param_groups:
        group["lr"] = float(group["lr"]) * lr / top if top > 0 else lr


def sample_probe(dataset: Any, size: int, seed: int) -> tuple[Any, Any]:
    """Draw ``size`` examples (all if fewer) without replacement, seeded, and collate them.

    Uses its own generator: the global RNG is untouched.
    """
    n = len(dataset)
    if n < 1:
        raise ValueError("probe dataset is empty")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(size, n)].sort().values
    samples = [dataset[int(i)] for i in idx]
    batch = torch.utils.data.default_collate(samples)
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ValueError(
            "probe dataset samples must be (input, target) pairs; pass explicit tensors as "
            "probe=(inputs, targets) otherwise"
        )
    return _detach(batch[0]), _detach(batch[1])


def _is_batch_like(x: Any) -> bool:
    """Inputs of an explicit probe pair: a tensor or a dict of tensors."""
    return isinstance(x, (torch.Tensor, dict))


def _length(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 0
    if isinstance(x, dict):
        return _length(next(iter(x.values())))
    if isinstance(x, (tuple, list)):
        return _length(x[0])
    return 0


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _first_finite(*values: Any) -> float:
    for v in values:
        if v is not None and math.isfinite(float(v)):
            return float(v)
    return math.nan


def _full_data_sigma(curv: Any) -> float:
    """The engine's full-data sigma estimate when it extrapolated (n > m), else the probe's."""
    for name in ("sigma_full", "full_sigma", "sigma_n", "extrapolated_sigma"):
        value = getattr(curv, name, None)
        if value is not None and math.isfinite(float(value)):
            return float(value)
    return float(curv.stats.sigma)


def _mean_gradient_sq_norm(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss: Any,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
) -> float:
    """|g_m|^2: squared norm of the gradient of the probe's mean loss (model as it is now).

    The per-sample losses are the engine's (:func:`.curvature.losses.per_sample_losses`, whose
    mean is the training loss with ``reduction="mean"``), over all trainable parameters, so
    that ``m^2 |g_m|^2`` is the sum of the engine's per-sample gradient Gram P.
    """
    from .curvature.losses import per_sample_losses

    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        outputs = forward_fn(model, inputs) if forward_fn is not None else model(inputs)
        mean = per_sample_losses(loss, outputs, targets).mean()
        grads = torch.autograd.grad(mean, params, allow_unused=True)
    return float(sum(g.double().square().sum() for g in grads if g is not None))


def _sam_alpha(probe_grad_sq: float, noise_scale: Any, m: int) -> float:
    """SAM's normaliser alpha: the norm of the gradient of the (full-data) training loss.

    Our :class:`~torch_coherence.optim.SAM` ascends to ``w + rho g / ||g||``. Linearised
    (paper 002, Theorem C.8; MATH.md §4) one step is ``J = I - eta H_t (I + (rho/alpha) H)``,
    the ascent through the mean Hessian H, i.e. the full gradient ``g = H w``, divided by
    ``alpha = ||g||``. ``alpha = 1`` would be *unnormalised* SAM (``e = rho g``).

    The probe batch's mean gradient over-estimates it: ``E|g_m|^2 = |G|^2 + tr(Sigma)/m``.
    With the engine's gradient noise scale ``B_simple = tr(Sigma)/|G|^2`` (both estimated from
    the same per-sample gradients), the unbiased estimate is
    ``|G|^2 = |g_m|^2 / (1 + B_simple/m)`` (exactly the engine's
    ``sum_{i != j} P_ij / (m (m - 1))``). Where that estimate is not positive (``B_simple``
    infinite: the gradient is below the noise) ``|g_m|`` is used.
    """
    g2 = max(probe_grad_sq, 0.0)
    if noise_scale is not None and math.isfinite(float(noise_scale)) and float(noise_scale) > 0:
        g2 = g2 / (1.0 + float(noise_scale) / m)
    return max(math.sqrt(g2), 1e-12)


def _mean_square_rate(
    curv: Any,
    lr: float,
    batch_size: float,
    n: int,
    momentum: float,
    sam_rho: float | None,
    sam_alpha: float,
) -> float | None:
    """rho(T) from :mod:`torch_coherence.dynamics` when it and the Gram are available.

    With the optimizer's heavy-ball momentum and, for SAM, its radius and normaliser
    (:func:`_sam_alpha`), as in the stability report.
    """
    gram = getattr(curv, "gram", None)
    if gram is None:
        return None
    try:
        from .dynamics import mean_square_rate
    except ImportError:
        return None
    value = mean_square_rate(
        gram, lr, batch_size, n=n, momentum=momentum, sam_rho=sam_rho, sam_alpha=sam_alpha
    )
    value = float(getattr(value, "rate", value))
    return value if math.isfinite(value) else None


def _ms_evidence(report: StabilityReport, metrics: dict[str, float]) -> str:
    rate = metrics.get("stability/mean_square_rate")
    if rate is not None and rate > 1.0:
        return f"rho(T) = {rate:.4g} > 1"
    return f"above Theorem 1's critical {_fmt(report.critical_lr)} (margin {report.margin:.2f})"


_CRIT_NAMES = {"typical": "typical", "mean_square": "Theorem 1", "theorem1": "Theorem 1"}


def _lyapunov_metrics(
    curv: Any,
    lr: float,
    batch_size: float,
    n: int,
    momentum: float,
    sam_rho: float | None,
    sam_alpha: float,
    seed: int,
) -> dict[str, float]:
    """gamma, its standard error and the typical critical lr on the first probe examples.

    The first :data:`LYAPUNOV_SAMPLES` examples' block of the Gram stand for the n training
    examples (:func:`torch_coherence.lyapunov_exponent`); empty without a Gram.
    """
    gram = getattr(curv, "gram", None)
    if gram is None:
        return {}
    from .dynamics import LyapunovPrecisionWarning, critical_lr_typical, lyapunov_exponent
    from .dynamics.curvature_space import as_coefficient_curvature

    k = min(int(gram.shape[0]), LYAPUNOV_SAMPLES)
    sub = gram[:k, :, :k, :] if gram.dim() == 4 else gram[:k, :k].reshape(k, 1, k, 1)
    cc = as_coefficient_curvature(sub, "gram")
    common: dict[str, Any] = {
        "momentum": momentum,
        "sam_rho": sam_rho,
        "sam_alpha": sam_alpha,
        "seed": seed,
        **LYAPUNOV_SETTINGS,
    }
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LyapunovPrecisionWarning)  # the stderr is logged
        g = lyapunov_exponent(cc, lr, batch_size, n, **common)
        if not math.isfinite(g.value):
            return out
        out["stability/lyapunov"] = float(g.value)
        out["stability/lyapunov_stderr"] = float(g.stderr) if math.isfinite(g.stderr) else 0.0
        try:
            c = critical_lr_typical(cc, batch_size, n, rel_tol=TYPICAL_LR_REL_TOL, **common)
        except (ValueError, RuntimeError, ArithmeticError):
            return out
    if math.isfinite(c.lr) and c.lr > 0:
        out["stability/typical_critical_lr"] = float(c.lr)
    return out


def _warn(message: str, category: type[Warning] = CoherenceWarning) -> None:
    warnings.warn(message, category, stacklevel=3)


def as_sequence(x: Any) -> Sequence[Any]:
    """``x`` as a list (helper for loggers given as one or many)."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
