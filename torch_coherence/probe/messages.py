"""Every sentence the probe says, and the warning categories it says them under.

Two categories carry a verdict, and they mean different things:

* :class:`BlowupWarning`: training is predicted to blow up. Only the empirical lookahead
  (real optimizer steps on a copy of the model) raises it: it is the criterion whose recall
  and false alarms against real training runs ``docs/warnings.md`` reports.
* :class:`LinearInstabilityWarning`: the linearized dynamics at these weights are unstable
  (Theorem 1, rho(T) > 1 or gamma > 0). A real network usually answers with a loss spike or a
  move to flatter weights, not necessarily with divergence (``docs/theory.md §8``).

Everything else (approaching a threshold, the edge of stability, learning rate 0, a failed
probe, configuration notes) is a plain :class:`CoherenceWarning`. No text here says
that training diverges.
"""

from __future__ import annotations

import math
from typing import Any

from ..theory import StabilityReport

__all__ = [
    "BlowupWarning",
    "CoherenceProbeError",
    "CoherenceWarning",
    "LinearInstabilityWarning",
    "UnstableTrainingError",
]

PREFIX = "torch-coherence"


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
    """Raised with ``on_unstable="raise"`` when the criterion of ``act_on`` fires.

    Attributes:
        report: the :class:`~torch_coherence.StabilityReport` of the probe (``None`` when
            there was none).
        step: the optimizer-step count at the probe.
    """

    def __init__(self, message: str, report: StabilityReport | None, step: int) -> None:
        super().__init__(message)
        self.report = report
        self.step = step


class CoherenceProbeError(RuntimeError):
    """Raised with ``on_unstable="raise"`` when the probe itself fails."""


#: How the criteria are named in the texts.
CRITERION_NAMES = {"typical": "typical", "mean_square": "Theorem 1", "theorem1": "Theorem 1"}


def fmt(x: float) -> str:
    """A number in 3 significant digits (``inf`` spelled out)."""
    return "inf" if math.isinf(x) else f"{x:.3g}"


def fmt_b(b: float) -> str:
    """A batch size: whole numbers without decimals."""
    if math.isinf(b):
        return "inf"
    return f"{b:.0f}" if b >= 10 or float(b).is_integer() else f"{b:.2g}"


def _head(step: int, criterion: str | None = None) -> str:
    if criterion is None:
        return f"{PREFIX} (optimizer step {step}): "
    return f"{PREFIX} (optimizer step {step}, criterion {criterion!r}): "


def batch_advice(report: StabilityReport) -> str:
    """The fix by Theorem 1's critical learning rate and batch size.

    Never advises a batch size above n (``critical_batch_size >= n`` or infinite: no batch
    size helps); a critical batch size below 1 reads "any batch size".
    """
    crit, b1 = fmt(report.critical_lr), report.critical_batch_size
    if math.isinf(b1) or b1 >= report.n:
        return f"lower it below {crit} (no batch size up to n = {report.n} helps at this rate)"
    if b1 < 1:
        return f"lower it below {crit} (Theorem 1 itself holds for any batch size at this rate)"
    return f"lower it below {crit} or raise the batch size above {fmt_b(b1)}"


def _numbers(report: StabilityReport, metrics: dict[str, float]) -> str:
    sharp_n = metrics.get("sharpness/samples")
    sigma_n = metrics.get("coherence/sigma_n")
    over_s = f" over {sharp_n:.0f} examples" if sharp_n is not None else ""
    over_g = f" over {sigma_n:.0f} examples" if sigma_n is not None else ""
    return (
        f"Sharpness {fmt(report.sharpness)}{over_s}, sigma {fmt(report.sigma)}{over_g}, "
        f"n = {report.n}"
    )


def linear_unstable(
    step: int,
    report: StabilityReport,
    criterion: str,
    metrics: dict[str, float],
    critical_lr: float,
) -> str:
    """The linearized dynamics are unstable by ``criterion``: which evidence, the fix."""
    if criterion == "typical":
        gamma = metrics.get("stability/lyapunov", math.nan)
        evidence = f"top Lyapunov exponent gamma = {gamma:+.3g} per step > 0"
        fix = (
            f"lower it below the typical critical {fmt(critical_lr)}"
            if math.isfinite(critical_lr)
            else "lower it"
        )
    elif criterion == "mean_square":
        rate = metrics.get("stability/mean_square_rate", math.nan)
        evidence = f"rho(T) = {rate:.4g} > 1: E||w_k||^2 of the linearized dynamics grows"
        fix = batch_advice(report)
    else:
        evidence = (
            f"Theorem 1's margin {report.margin:.2f} > 1: mean-square divergence of the "
            "linearized dynamics"
        )
        fix = batch_advice(report)
    return (
        _head(step, criterion) + f"the linearized dynamics at these weights are unstable at "
        f"learning rate {fmt(report.lr)}, batch size {fmt_b(report.batch_size)} ({evidence}). "
        "Expect a loss spike or a move to flatter weights, not necessarily divergence. To "
        f"keep them stable, {fix}. {_numbers(report, metrics)}."
    )


def mean_square_only(step: int, report: StabilityReport, metrics: dict[str, float]) -> str:
    """Theorem 1 (or rho(T)) fails while gamma < 0: the mean-square-only case, explained."""
    gamma = metrics.get("stability/lyapunov", math.nan)
    se = metrics.get("stability/lyapunov_stderr", 0.0)
    typical = metrics.get("stability/typical_critical_lr", math.nan)
    rate = metrics.get("stability/mean_square_rate")
    evidence = (
        f"rho(T) = {rate:.4g} > 1"
        if rate is not None and rate > 1.0
        else f"above Theorem 1's critical {fmt(report.critical_lr)} (margin {report.margin:.2f})"
    )
    sign = (
        "is negative: a typical linearized run still contracts"
        if gamma < 0
        else f"is not significantly positive (+- {se:.2g}): a typical linearized run barely grows"
    )
    return (
        _head(step) + "the linearized dynamics are mean-square unstable: their fluctuations "
        "grow without bound although most runs still settle. Learning rate "
        f"{fmt(report.lr)}, batch size {fmt_b(report.batch_size)}: {evidence}, but the top "
        f"Lyapunov exponent gamma = {gamma:+.3g} per step {sign}, up to the typical critical "
        f"learning rate {fmt(typical)}. Expect rare loss spikes, not divergence."
    )


def approaching(
    step: int,
    report: StabilityReport,
    criterion: str,
    margin: float,
    critical_lr: float,
    margin_warning: float,
) -> str:
    """The note at an upward crossing of ``margin_warning``."""
    fix = f"lower it below {fmt(critical_lr)}" if criterion == "typical" else batch_advice(report)
    return (
        _head(step, criterion) + f"stability margin {margin:.2f} reached {margin_warning:g}: "
        f"learning rate {fmt(report.lr)} is close to the {CRITERION_NAMES[criterion]} critical "
        f"{fmt(critical_lr)} for batch size {fmt_b(report.batch_size)}, above which the "
        "linearized dynamics are unstable (a loss spike or a move to flatter weights, not "
        f"necessarily divergence); to keep a safety margin, {fix}."
    )


def blowup(step: int, batch_size: float, lookahead: Any, blowup_factor: float) -> str:
    """The lookahead blew up at the current learning rate: the one blow-up prediction."""
    multiples = tuple(float(x) for x in lookahead.multiples)
    at = multiples.index(1.0) if 1.0 in multiples else 0
    end = float(lookahead.loss_end[at])
    calm = [x for x, b in zip(multiples, lookahead.blew_up, strict=False) if not b and x < 1.0]
    fix = (
        f"Lower the learning rate to at most {fmt(max(calm) * lookahead.lr)} (no blow-up there "
        "in the lookahead)"
        if calm
        else "Lower the learning rate"
    )
    return (
        _head(step) + f"training is predicted to blow up at learning rate {fmt(lookahead.lr)}, "
        f"batch size {fmt_b(batch_size)}: {lookahead.steps} real optimizer steps on a copy of "
        f"the model from these weights took the training loss from "
        f"{fmt(float(lookahead.loss_start))} to {fmt(end)} (more than {blowup_factor:g}x; the "
        f"criterion measured against real runs in docs/warnings.md). {fix}."
    )


def edge_of_stability(step: int, report: StabilityReport, tolerance: float) -> str:
    """Sharpness at 2 (1 + beta) / lr within its uncertainty while the loss keeps falling."""
    return (
        _head(step) + f"at the edge of stability: the sharpness {fmt(report.sharpness)} is at "
        f"the gradient-descent bound 2 (1 + momentum) / lr = {fmt(report.gd_threshold)} within "
        f"its uncertainty (+- {fmt(tolerance)}) while the training loss keeps falling. Training "
        "commonly settles here, with the sharpness hovering at that bound (docs/theory.md §8): "
        "the linear instability at these weights is expected and is not a blow-up warning "
        "(said once)."
    )


def lr_zero(step: int, critical_lr: float, batch_size: float) -> str:
    """The learning rate is 0 (e.g. warm-up): nothing to assess, said once per stretch."""
    return (
        _head(step) + "the learning rate is 0 (warm-up?): no step moves the weights, so there "
        "is nothing to assess yet; Theorem 1's critical learning rate at these weights is "
        f"{fmt(critical_lr)} for batch size {fmt_b(batch_size)}. Stability is assessed once the "
        "learning rate is positive."
    )


def gram_missing(step: int, criterion: str) -> str:
    """The criterion needs the probe's block Gram, which the engine did not return."""
    what = "gamma" if criterion == "typical" else "rho(T)"
    return (
        _head(step) + f"criterion={criterion!r} needs {what}, which this probe did not compute: "
        "the probe's block Gram is not available (probe size x outputs > 1024; pass "
        "engine_kwargs={'return_gram': True} or a smaller probe_size). Probes without it use "
        "Theorem 1 (said once)."
    )


def adjusted_lr(step: int, old: float, new: float, safety: float, basis: str, ref: float) -> str:
    """``on_unstable="adjust_lr"`` lowered the learning rate."""
    return (
        f"{PREFIX}: on_unstable='adjust_lr' lowered the learning rate from {fmt(old)} to "
        f"{fmt(new)} ({safety:g} x the {basis} {fmt(ref)}) at optimizer step {step}"
    )


def optimizer_note(name: str) -> str:
    """The thresholds are SGD's: said once for another optimizer."""
    return (
        f"{PREFIX}: the stability thresholds are derived for SGD (and SAM over SGD); with "
        f"{name} they describe SGD at the same learning rate, batch size and momentum, not the "
        "adaptive update"
    )


def failed(step: int, err: BaseException, raising: bool) -> str:
    """A probe failed (training continues unless ``on_unstable="raise"``)."""
    what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    tail = "" if raising else "; training continues"
    return f"{PREFIX}: the coherence probe at optimizer step {step} failed ({what}){tail}"


def lookahead_failed(step: int, err: BaseException) -> str:
    """The lookahead part failed; the rest of the probe stands (said once)."""
    what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return (
        f"{PREFIX}: the blow-up lookahead at optimizer step {step} failed ({what}); the probe "
        "goes on without a blow-up prediction (said once)"
    )


def blown_up(step: int, trigger: str, err: BaseException, raising: bool) -> str:
    """The probe triggered by a non-finite loss could not measure: training has blown up."""
    what = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    tail = "" if raising else " The probe goes on at the next trigger or scheduled step."
    return (
        _head(step) + f"training has blown up: {trigger}, and the probe cannot measure these "
        f"weights ({what}). Restart from a checkpoint before the blow-up with a lower learning "
        f"rate.{tail}"
    )


def dataset_estimates_failed(step: int, err: BaseException) -> str:
    """The data-set estimates of ``estimates="auto"`` failed: the probe's own values stand."""
    what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return (
        f"{PREFIX}: the training set's sharpness and sigma at optimizer step {step} could not "
        f"be computed ({what}); the probe logs its own values over its m examples instead "
        "(coherence/sigma_n and sharpness/samples say so; said once)"
    )
