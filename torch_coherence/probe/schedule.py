"""When to probe: optimizer steps, the time budget, the pre-flight probe and the triggers.

Three kinds of probe (:attr:`Schedule.kind`):

* ``"preflight"``: :meth:`Schedule.start` (fit start and resume) makes the next
  :meth:`Schedule.due` true, before the first optimizer step, so that the weights are judged
  at the current learning rate and batch size before anything can blow up (real runs above
  their blow-up learning rate blow up 1-14 steps after the rate is set, ``docs/theory.md §8``).
* ``"triggered"``: :meth:`Schedule.observe`, called after each optimizer step with the loss
  the loop already computed, asks for a probe at once when the loss is not finite, when it
  exceeds :data:`SPIKE_FACTOR` times its running median (and :data:`SPIKE_FLOOR` times the
  loss at the fit's start, and :data:`SPIKE_OVER_MAX` times the largest older loss of the
  window), or when the learning rate changed by more than :data:`LR_FACTOR` since the last
  probe; at most ``max_triggered`` per fit.
* ``"scheduled"``: every ``every_n_steps`` optimizer steps, stretched by the time budget.
  When a scheduled probe's full cost does not fit the budget yet, a ``"light"`` probe
  (:mod:`.light`: the tracked sharpness, about one or two training steps) runs in its
  place, in the budget; it may ask for a triggered full probe (:meth:`Schedule.request`).

Budget (``max_overhead``): scheduled probes, and the optional parts (lookahead, gamma,
figures) that run only when :meth:`Schedule.affordable`, take at most that fraction of the
training time measured since the first step of the fit. Pre-flight and triggered probes are
outside the budget (one per start, at most ``max_triggered`` per fit). With a probe costing
``c`` training steps, scheduled probes come every ``max(every_n_steps, c / max_overhead)``
steps: with the defaults (100 steps, 3%) a fit of 1000 steps gets the pre-flight probe and
at least 9 scheduled ones when a probe costs at most 3 training steps (for instance 30 ms
against 10 ms steps). A full probe of 30 training steps or more (a sub-millisecond step, an
expensive model, the data-set estimates) fits about once per 1000 steps or less; in its
place the light probe (about 1-3 training steps) keeps the rhythm of ``every_n_steps``
wherever it fits, and asks for a full probe when the tracked sharpness calls for one.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections import deque
from typing import Any

import torch

from .assess import _unwrap

__all__ = ["LR_FACTOR", "SPIKE_FACTOR", "SPIKE_FLOOR", "SPIKE_OVER_MAX", "Schedule"]

#: A loss above this many times its running median triggers a probe ...
SPIKE_FACTOR = 3.0
#: ... when it is also above this fraction of the loss at the fit's start (the median of its
#: first :data:`MIN_LOSSES` losses; at resume, the resumed fit's). Without it, a converging
#: fit's noise fired the guard on tiny losses: the digits CNN (B = 64, lr 0.1, from
#: initialisation, start loss about 2.3) had 10 triggers (all of ``max_triggered``) at steps
#: 368-821 on losses of 0.05-0.22 against medians of 0.015-0.064, in a run that never blew up.
SPIKE_FLOOR = 0.5
#: ... and above this many times the largest loss of the window before its last
#: :data:`SPIKE_RECENT` (the last :data:`LOSS_WINDOW` losses, without the newest ones, so that
#: a loss growing by 1.2-1.5x a step still triggers within a few steps): a spike must stand
#: out from the window's own batch noise. Measured on the blow-up grid's held-out seeds
#: (``benchmarks/bench_guard.py``: 270 runs of 300 steps, three setups, B = 8/32/128,
#: 0.25-4x the blow-up lr): without it the loss rule fired 503 times in the 134 runs that
#: never blew up (up to ``max_triggered`` in most calm runs at B = 8 and 32, each a full
#: probe), with it 23; end to end the probes it no longer asks for had added no blow-up
#: warning that the pre-flight probe had not given already (``docs/warnings.md``).
SPIKE_OVER_MAX = 2.0
SPIKE_RECENT = 5
#: A learning rate that changed by more than this factor since the last probe triggers one.
LR_FACTOR = 2.0
#: Window of the running median and the least number of losses before it is used.
LOSS_WINDOW = 50
MIN_LOSSES = 10
#: Steps after a loss trigger during which the loss triggers nothing more.
TRIGGER_COOLDOWN = 10


def now() -> float:
    """The clock of the schedule (tests replace it by a fake one)."""
    return time.perf_counter()


def count_target(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` runs exactly once per training step (SAM: its base)."""
    opt = _unwrap(optimizer)
    return getattr(opt, "base_optimizer", opt)


class Schedule:
    """Step count, time budget, pre-flight probe and triggers (see the module doc).

    Args:
        every_n_steps: scheduled probes at least this many optimizer steps apart.
        max_overhead: the time budget (fraction of training time), or ``None``.
        max_triggered: the most probes :meth:`observe` triggers per fit.
    """

    def __init__(self, every_n_steps: int, max_overhead: float | None, max_triggered: int) -> None:
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.max_triggered = max_triggered
        self.steps = 0
        self.last_probe_step = 0
        self.scheduled_step = every_n_steps
        self.probe_seconds = 0.0  # budgeted: scheduled probes, optional parts, figures
        self.outside_seconds = 0.0  # pre-flight and triggered probes
        self.t0: float | None = None
        self.t0_steps = 0
        self.pending: str | None = None  # "preflight" or the reason of a trigger
        self.triggered = 0
        self.last_probe_lr: float | None = None
        self.last_cost: float | None = None  # of the last probe without its optional parts
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.start_loss: float | None = None
        self._loss_quiet_until = 0

    # ------------------------------------------------------------------ steps
    def count_step(self) -> None:
        """Count one optimizer step."""
        if self.t0 is None:  # work before the first step (pre-flight) is not in the clock
            self.t0 = now() - self.probe_seconds - self.outside_seconds
            self.t0_steps = self.steps
        self.steps += 1

    def start(self) -> None:
        """A fit starts or resumes: the next :meth:`due` is the pre-flight probe.

        The budget clock, the loss history and the trigger count start afresh.
        """
        self.pending = "preflight"
        self.t0 = None
        self.probe_seconds = 0.0
        self.outside_seconds = 0.0
        self.triggered = 0
        self.losses.clear()
        self.start_loss = None
        self._loss_quiet_until = 0

    def observe(self, loss: Any = None, lr: float | None = None) -> bool:
        """Per-step guard on what the loop already computed; whether it triggered a probe.

        Args:
            loss: the training loss of the step just taken (a float or a 0-d tensor; no
                forward pass is run).
            lr: the optimizer's current (largest) learning rate.
        """
        reason = self._loss_reason(loss)
        if reason is None and lr is not None:
            reason = self._lr_reason(float(lr))
        if not self.request(reason):
            return False
        if "loss" in reason:
            self._loss_quiet_until = self.steps + TRIGGER_COOLDOWN
        return True

    def request(self, reason: str | None) -> bool:
        """Ask for a triggered probe at once (the guard of :meth:`observe`, a light probe's
        escalation); whether it was granted: none is pending and fewer than
        ``max_triggered`` were triggered in this fit."""
        if reason is None or self.pending is not None:
            return False
        if self.triggered >= self.max_triggered:
            return False
        self.triggered += 1
        self.pending = reason
        return True

    def _loss_reason(self, loss: Any) -> str | None:
        if loss is None:
            return None
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        quiet = self.steps < self._loss_quiet_until
        if not math.isfinite(value):
            return None if quiet else f"non-finite training loss {value}"
        reason = None
        if len(self.losses) >= MIN_LOSSES and not quiet:
            median = statistics.median(self.losses)
            floor = SPIKE_FLOOR * (self.start_loss or 0.0)
            older = itertools.islice(self.losses, len(self.losses) - SPIKE_RECENT)
            loud = value > SPIKE_OVER_MAX * max(older)
            if median > 0 and value > SPIKE_FACTOR * median and value > floor and loud:
                reason = (
                    f"training loss {value:.4g} above {SPIKE_FACTOR:g} x its running median "
                    f"{median:.4g}"
                )
        self.losses.append(value)
        if self.start_loss is None and len(self.losses) >= MIN_LOSSES:
            self.start_loss = statistics.median(self.losses)
        return reason

    def _lr_reason(self, lr: float) -> str | None:
        old = self.last_probe_lr
        if old is None or lr <= 0 or not math.isfinite(lr):
            return None
        if old <= 0 or max(lr / old, old / lr) > LR_FACTOR:
            return f"learning rate changed from {old:.4g} to {lr:.4g} since the last probe"
        return None

    def loss_falling(self) -> bool | None:
        """Whether the training loss keeps falling: the median of the newer half of the
        window below that of the older half (``None`` with fewer than 2 x MIN_LOSSES)."""
        if len(self.losses) < 2 * MIN_LOSSES:
            return None
        values = list(self.losses)
        half = len(values) // 2
        return statistics.median(values[half:]) < statistics.median(values[:half])

    # ------------------------------------------------------------------ due
    @property
    def next_probe_step(self) -> int:
        """The optimizer-step count at which the next probe is due."""
        return self.steps if self.pending is not None else self.scheduled_step

    @property
    def kind(self) -> str:
        """``"preflight"``, ``"triggered"`` or ``"scheduled"``: the kind of the due probe."""
        if self.pending == "preflight":
            return "preflight"
        return "triggered" if self.pending is not None else "scheduled"

    def due(self) -> bool:
        """Whether a probe is due now: a function of the step count and of what
        :meth:`start`, :meth:`observe` and the recorded probes set, never of a clock, so that
        every DDP rank that counts and observes the same agrees."""
        return self.pending is not None or self.steps >= self.scheduled_step

    def postponed_step(self) -> int | None:
        """For a due scheduled probe whose last measured cost does not fit in the budget yet
        (the first one included, once the pre-flight probe has measured the cost): the step
        it moves to; else ``None``. Asked by the measuring rank only."""
        if self.pending is not None or self.last_cost is None or self.t0 is None:
            return None
        if self.affordable(self.last_cost):
            return None
        return max(self.next_step(self.steps, self.last_cost, 0.0), self.steps + 1)

    # ------------------------------------------------------------------ budget
    def training_seconds(self) -> float:
        """Wall time since the fit's first counted step, less the time spent probing."""
        if self.t0 is None:
            return 0.0
        return now() - self.t0 - self.probe_seconds - self.outside_seconds

    def affordable(self, seconds: float, spent: float = 0.0) -> bool:
        """Whether ``seconds`` more work, after ``spent`` uncharged so far, fits the budget."""
        if self.max_overhead is None:
            return True
        train = self.training_seconds() - spent  # ``spent`` is probing, not training
        return self.probe_seconds + spent + seconds <= self.max_overhead * train

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of diagnostic work against the time budget."""
        self.probe_seconds += max(float(seconds), 0.0)

    def next_step(self, step: int, cost: float, elapsed: float | None = None) -> int:
        """Where the next scheduled probe goes after one at ``step`` costing ``cost`` of the
        budget, the next one included at that cost; ``elapsed``: the wall time of this probe
        not yet recorded (default ``cost``)."""
        fixed = (step // self.every_n_steps + 1) * self.every_n_steps
        if self.max_overhead is None or self.t0 is None:
            return fixed
        elapsed = cost if elapsed is None else elapsed
        train = self.training_seconds() - elapsed
        per_step = max(train, 1e-9) / max(step - self.t0_steps, 1)
        spent = self.probe_seconds + (elapsed if cost > 0 else 0.0)
        needed = (spent + cost) / self.max_overhead - train
        return max(fixed, step + math.ceil(max(needed, 0.0) / per_step))

    def record(
        self,
        step: int,
        kind: str,
        seconds: float,
        next_step: int,
        lr: float | None,
        base: float | None = None,
    ) -> None:
        """A probe of ``kind`` ran at ``step`` (``base`` of its ``seconds`` without the
        optional parts): clear it, charge it, move the schedule."""
        if kind == "postponed":  # nothing ran: only the schedule moves
            self.scheduled_step = max(next_step, step + 1)
            return
        if kind == "light":  # in the budget; the full probe's cost and lr stay the reference
            self.probe_seconds += seconds
            self.scheduled_step = max(next_step, step + 1)
            return
        self.last_probe_step = step
        self.last_cost = seconds if base is None else base
        if kind == "scheduled":
            self.probe_seconds += seconds
            self.scheduled_step = max(next_step, step + 1)
        else:
            self.outside_seconds += seconds
            if self.steps >= self.scheduled_step:  # a scheduled probe was due as well
                self.scheduled_step = max(next_step, step + 1)
        self.pending = None
        if lr is not None:
            self.last_probe_lr = lr

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "last_probe_step": self.last_probe_step,
            "next_probe_step": self.scheduled_step,
            "triggered": self.triggered,
            "last_probe_lr": self.last_probe_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_probe_step = int(state["last_probe_step"])
        self.scheduled_step = int(state.get("next_probe_step", self.steps + 1))
        self.triggered = int(state.get("triggered", 0))
        lr = state.get("last_probe_lr")
        self.last_probe_lr = None if lr is None else float(lr)
