"""The policy: which verdict counts as unstable, warn once per crossing, and what to do.

Two verdicts come out of a probe (see :mod:`.messages` for their warning categories):

* the **blow-up prediction** of the empirical lookahead (``lookahead.predicted``: real
  optimizer steps on a copy of the model blew up at the current learning rate), warned with
  :class:`~torch_coherence.BlowupWarning`;
* the **linear verdict** of ``criterion`` (``"typical"``: gamma > 0; ``"mean_square"``:
  rho(T) > 1; ``"theorem1"``: Theorem 1's margin above 1), warned with
  :class:`~torch_coherence.LinearInstabilityWarning`.

``on_unstable`` acts on the verdict named by ``act_on`` (default the blow-up prediction).
Everything here is a pure function of the policy's settings, the assessment and the
hysteresis state it is handed: :meth:`Policy.decide` returns the new state, which
:meth:`~torch_coherence.probe.CoherenceProbe.commit` stores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..theory import StabilityReport
from . import messages as text
from .assess import Assessment, _unwrap
from .messages import BlowupWarning, CoherenceWarning, LinearInstabilityWarning

__all__ = [
    "ACT_ON",
    "CRITERIA",
    "ON_UNSTABLE",
    "Decision",
    "Policy",
    "PolicyState",
    "set_learning_rate",
]

#: The actions ``on_unstable`` accepts.
ON_UNSTABLE = ("warn", "raise", "stop", "adjust_lr")

#: What ``criterion`` accepts: the linear verdict. ``"typical"``, the top Lyapunov exponent
#: gamma > 0 (a typical run of the linearized dynamics grows); ``"mean_square"``, rho(T) > 1
#: (E||w||^2 of the linearized dynamics diverges, although most runs may still settle);
#: ``"theorem1"``, the margin of paper 000's Theorem 1 (or the GD condition) above 1, a
#: sufficient condition of mean-square divergence that needs no dynamics computation.
#: Always theorem1 => mean_square and typical => mean_square (gamma <= log rho(T) / 2).
CRITERIA = ("typical", "mean_square", "theorem1")

#: What ``act_on`` accepts: the verdict ``on_unstable`` acts on.
ACT_ON = ("blowup", "linear")


@dataclass(frozen=True)
class PolicyState:
    """Hysteresis and one-time notes (saved by ``state_dict``).

    ``approach``, ``linear``, ``note``, ``blowup``: armed to warn at the next upward crossing
    of ``margin_warning``, of the linear verdict, of the mean-square-only case and of the
    blow-up prediction. ``eos``: the edge-of-stability note is still to be said (once).
    ``lr_zero``: the learning-rate-0 note is armed. ``noted_gram``, ``noted_optimizer``,
    ``noted_lookahead``, ``noted_dataset``: one-time notes already said. ``last_used``: the
    linear criterion of the last probe.
    """

    approach: bool = True
    linear: bool = True
    note: bool = True
    blowup: bool = True
    eos: bool = True
    lr_zero: bool = True
    noted_gram: bool = False
    noted_optimizer: bool = False
    noted_lookahead: bool = False
    noted_dataset: bool = False
    last_used: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: Any) -> PolicyState:
        """From :meth:`as_dict`, or the list of three flags older versions saved."""
        if isinstance(saved, dict):
            names = cls.__dataclass_fields__
            return cls(**{k: v for k, v in saved.items() if k in names})
        flags = [bool(a) for a in saved]
        return cls(*flags[:3]) if len(flags) >= 3 else cls(*flags)


@dataclass(frozen=True)
class Decision:
    """What :meth:`Policy.decide` decided: messages with their categories, state, actions."""

    messages: tuple[str, ...]
    categories: tuple[type[Warning], ...]
    state: PolicyState
    stop: bool = False
    new_lr: float | None = None
    raise_error: bool = False


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Scale every group's learning rate so that the largest becomes ``lr``."""
    opt = _unwrap(optimizer)
    top = max(float(g["lr"]) for g in opt.param_groups)
    for group in opt.param_groups:
        group["lr"] = float(group["lr"]) * lr / top if top > 0 else lr


@dataclass(frozen=True)
class Policy:
    """Settings of the warnings and actions (validated by the probe's constructor)."""

    criterion: str = "typical"
    on_unstable: str = "warn"
    act_on: str = "blowup"
    margin_warning: float | None = 0.8
    lr_safety: float = 0.5
    blowup_factor: float = 10.0

    def verdict(
        self, report: StabilityReport, metrics: dict[str, float]
    ) -> tuple[str, bool, float, float]:
        """(linear criterion used, unstable by it, its margin, its critical learning rate).

        ``"typical"`` without gamma and ``"mean_square"`` without rho(T) fall back to
        Theorem 1.
        """
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

    def decide(
        self,
        step: int,
        assessment: Assessment,
        state: PolicyState,
        *,
        lookahead: Any = None,
        edge_of_stability: float | None = None,
        gram_missing: bool = False,
    ) -> Decision:
        """Warnings (once per upward crossing) and the action of ``on_unstable``.

        Args:
            step: the optimizer-step count of the probe.
            assessment: from :func:`~torch_coherence.probe.assess.assess`.
            state: the hysteresis state before this probe.
            lookahead: the lookahead result of this probe, or ``None`` when none ran.
            edge_of_stability: the sharpness tolerance when this probe is at the edge of
                stability (sharpness at the GD bound while the loss keeps falling), else
                ``None``.
            gram_missing: the linear criterion needed the probe's Gram and it was absent.
        """
        out: list[tuple[str, type[Warning]]] = []
        report, metrics = assessment.report, assessment.metrics
        if report is None:  # learning rate 0: said once per stretch, nothing else
            if state.lr_zero:
                crit = metrics.get("stability/critical_lr", math.nan)
                out.append((text.lr_zero(step, crit, assessment.batch_size), CoherenceWarning))
            return _decision(out, replace(state, lr_zero=False))
        state = replace(state, lr_zero=True)
        used, unstable, margin, crit = self.verdict(report, metrics)
        # a probe judged by another criterion than the last (gamma skipped for the time
        # budget) may disarm but not re-arm: no repeated warning or action from flipping
        same = state.last_used in (None, used)
        state = replace(state, last_used=used)
        if gram_missing and not state.noted_gram:
            out.append((text.gram_missing(step, self.criterion), CoherenceWarning))
            state = replace(state, noted_gram=True)
        state = self._approach(step, report, used, unstable, margin, crit, same, state, out)
        # the linear warning re-arms only below the warning band (margin < margin_warning,
        # or < 1 without one): a verdict flapping around its boundary warns once
        calm = math.isfinite(margin) and margin < (self.margin_warning or 1.0)
        state = self._linear(
            step, assessment, used, unstable, crit, same and calm, state, out, edge_of_stability
        )
        predicted = bool(lookahead is not None and lookahead.predicted)
        if predicted and state.blowup:
            out.append(
                (text.blowup(step, report.batch_size, lookahead, self.blowup_factor), BlowupWarning)
            )
            state = replace(state, blowup=False)
        elif lookahead is not None and not predicted:
            state = replace(state, blowup=True)
        acting = predicted if self.act_on == "blowup" else unstable
        if not acting:
            return _decision(out, state)
        return self._act(step, report, used, crit, lookahead, state, out)

    def _approach(self, step, report, used, unstable, margin, crit, same, state, out):
        if self.margin_warning is None or not math.isfinite(margin):
            return state
        if self.margin_warning <= margin <= 1 and not unstable and state.approach:
            msg = text.approaching(step, report, used, margin, crit, self.margin_warning)
            out.append((msg, CoherenceWarning))
            return replace(state, approach=False)
        if margin < self.margin_warning and same:
            return replace(state, approach=True)
        return state

    def _linear(self, step, assessment, used, unstable, crit, rearm, state, out, eos):
        report, metrics = assessment.report, assessment.metrics
        # the mean-square-only case, said once per crossing, when gamma is the criterion
        rate = metrics.get("stability/mean_square_rate")
        ms_fails = report.unstable or (rate is not None and rate > 1.0)
        if used == "typical" and not unstable and ms_fails and state.note:
            out.append((text.mean_square_only(step, report, metrics), LinearInstabilityWarning))
            state = replace(state, note=False)
        elif not ms_fails:
            state = replace(state, note=True)
        if eos is not None and (unstable or ms_fails):
            # at the edge of stability the linear instability is the expected state: the
            # note replaces the linear warning, once per fit
            if state.eos:
                out.append((text.edge_of_stability(step, report, eos), CoherenceWarning))
                state = replace(state, eos=False)
            return state
        if unstable:
            if state.linear:
                msg = text.linear_unstable(step, report, used, metrics, crit)
                out.append((msg, LinearInstabilityWarning))
                state = replace(state, linear=False, approach=False)
        elif rearm:
            state = replace(state, linear=True)
        return state

    def _act(self, step, report, used, crit, lookahead, state, out) -> Decision:
        if self.on_unstable == "stop":
            return _decision(out, state, stop=True)
        if self.on_unstable == "raise":
            return _decision(out, state, raise_error=True)
        if self.on_unstable != "adjust_lr":
            return _decision(out, state)
        if self.act_on == "blowup":
            basis, ref = "lookahead blow-up learning rate", float(lookahead.blowup_lr)
        elif math.isfinite(crit):
            basis, ref = f"{text.CRITERION_NAMES[used]} critical", crit
        else:  # e.g. the typical critical lr was not found
            basis, ref = "Theorem 1 critical", report.critical_lr
        # never raise the learning rate (rho(T) > 1 can hold below Theorem 1's)
        new_lr = self.lr_safety * min(ref, report.lr)
        out.append(
            (
                text.adjusted_lr(step, report.lr, new_lr, self.lr_safety, basis, ref),
                CoherenceWarning,
            )
        )
        return _decision(out, state, new_lr=new_lr)


def _decision(out: list[tuple[str, type[Warning]]], state: PolicyState, **kw: Any) -> Decision:
    return Decision(
        messages=tuple(m for m, _ in out), categories=tuple(c for _, c in out), state=state, **kw
    )
