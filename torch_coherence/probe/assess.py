r"""The pure assessment: curvature estimates + optimizer settings + B + n -> report and metrics.

:func:`assess` is the functional twin of :class:`~torch_coherence.probe.CoherenceProbe` (as
torchmetrics pairs ``functional/`` with its classes): given what the curvature engine measured
on a probe batch, the optimizer's settings, the batch size B and the data-set size n, it
returns the :class:`~torch_coherence.StabilityReport` and the flat dict of metrics under the
tags of :mod:`.tags`. It holds no state, draws no global random numbers and never touches a
model.

The sharpness and sigma enter as :class:`Estimate` values that say how many examples they
refer to and how uncertain they are. By default they are the probe's own values (over its m
examples, no standard error); a data-set-wide sharpness or a full-data sigma estimate goes in
through the ``sharpness=`` and ``sigma=`` arguments, and ``coherence/sigma_n`` /
``sharpness/samples`` then say what they cover (``docs/theory.md §6``: sigma over m examples
is not sigma over n).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..theory import StabilityReport, critical_lr, stability_report

__all__ = [
    "Assessment",
    "Estimate",
    "assess",
    "effective_optimizer_params",
    "linear_dynamics",
    "probe_estimates",
    "sam_alpha",
]

#: Probe examples (the first ones) on which gamma and the typical critical learning rate
#: are computed, and the Monte-Carlo settings (:func:`torch_coherence.lyapunov_exponent`):
#: on a digits MLP probe (64 examples, C = 10) gamma costs 0.08 s and the typical critical
#: learning rate 0.34 s on one CPU thread (``docs/reproducing.md``, "Cost of the dynamics
#: computations").
LYAPUNOV_SAMPLES = 64
LYAPUNOV_SETTINGS = {"steps": 200, "repeats": 4}
TYPICAL_LR_REL_TOL = 2e-2


@dataclass(frozen=True)
class Estimate:
    """A number with the count of examples it refers to and its standard error.

    Attributes:
        value: the estimate.
        n: the number of examples it is computed over (or stands for).
        stderr: its standard error; ``nan`` when unknown.
    """

    value: float
    n: int
    stderr: float = math.nan


@dataclass(frozen=True)
class Assessment:
    """What :func:`assess` returns.

    Attributes:
        report: the stability report, or ``None`` at learning rate 0 (nothing to assess).
        metrics: tag -> value.
        settings: the optimizer settings used (``lr``, ``momentum``, ``weight_decay``,
            ``sam_rho``, ``sam_alpha``).
        batch_size: B as used (clamped to [1, n]).
        n: the data-set size.
        sharpness: the sharpness estimate used (before weight decay).
        sigma: the sigma estimate used.
    """

    report: StabilityReport | None
    metrics: dict[str, float]
    settings: dict[str, float | None]
    batch_size: float
    n: int
    sharpness: Estimate
    sigma: Estimate
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        return float(self.settings["lr"] or 0.0)


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


def _first_finite(*values: Any) -> float:
    for v in values:
        if v is not None and math.isfinite(float(v)):
            return float(v)
    return math.nan


def probe_estimates(curvature: Any, m: int | None = None) -> tuple[Estimate, Estimate]:
    """The probe's own sharpness (GGN, else the Gram's) and sigma, both over its m examples
    (``m``: default the report's ``num_samples``)."""
    stats = curvature.stats
    if m is None:
        m = int(getattr(curvature, "num_samples", 0) or 0)
    ggn = _first_finite(getattr(curvature, "ggn_sharpness", None), stats.sharpness)
    return Estimate(ggn, m), Estimate(float(stats.sigma), m)


def sam_alpha(mean_grad_sq: float | None, noise_scale: Any, m: int) -> float:
    r"""SAM's normaliser alpha: the norm of the gradient of the (full-data) training loss.

    Our :class:`~torch_coherence.optim.SAM` ascends to ``w + rho g / ||g||``. Linearised
    (paper 002, Theorem C.8; ``docs/theory.md §4``) one step is
    ``J = I - eta H_t (I + (rho/alpha) H)``, the ascent through the mean Hessian H, i.e. the
    full gradient ``g = H w``, divided by ``alpha = ||g||``.

    The probe's mean gradient over-estimates it: ``E|g_m|^2 = |G|^2 + tr(Sigma)/m``. With the
    engine's gradient noise scale ``B_simple = tr(Sigma)/|G|^2`` (from the same per-sample
    gradients), the unbiased estimate is ``|G|^2 = |g_m|^2 / (1 + B_simple/m)``, exactly
    ``sum_{i != j} P_ij / (m (m - 1))`` of the engine's gradient Gram P, where
    ``|g_m|^2 = 1^T P 1 / m^2``. Where that estimate is not positive (``B_simple`` infinite)
    ``|g_m|`` is used. ``mean_grad_sq=None`` (unknown) gives 1.
    """
    if mean_grad_sq is None:
        return 1.0
    g2 = max(float(mean_grad_sq), 0.0)
    if noise_scale is not None and math.isfinite(float(noise_scale)) and float(noise_scale) > 0:
        g2 = g2 / (1.0 + float(noise_scale) / m)
    return max(math.sqrt(g2), 1e-12)


def assess(
    curvature: Any,
    optimizer: Any,
    batch_size: float,
    n: int,
    *,
    sharpness: Estimate | None = None,
    sigma: Estimate | None = None,
    mean_grad_sq: float | None = None,
    lookahead: Any = None,
    mean_square_rate: bool = False,
    lyapunov: bool = False,
    seed: int = 0,
    m: int | None = None,
) -> Assessment:
    """Stability report and metrics from a curvature measurement.

    Args:
        curvature: a :class:`~torch_coherence.CurvatureReport` (or anything with ``stats``,
            ``ggn_sharpness``, ``hessian_sharpness``, ``gradient_noise_scale``, ``gram``,
            ``num_samples``).
        optimizer: an optimizer, or the dict of :func:`effective_optimizer_params`.
        batch_size: B of one optimizer step (clamped to [1, n]).
        n: the training-set size the thresholds refer to.
        sharpness: the sharpness estimate (default: the probe's GGN sharpness, n = m).
        sigma: the sigma estimate (default: the probe's sigma, n = m).
        mean_grad_sq: ``|g_m|^2``, the squared norm of the probe's mean loss gradient, for
            SAM's normaliser (:func:`sam_alpha`); ignored without SAM.
        lookahead: a lookahead result; logs ``stability/blowup_lr``.
        mean_square_rate: also compute rho(T) (needs the Gram).
        lyapunov: also compute gamma and the typical critical learning rate (needs the Gram).
        seed: seed of the Lyapunov Monte Carlo.
        m: the probe's number of examples (default the report's ``num_samples``).

    Raises:
        FloatingPointError: the sharpness or sigma is not finite.
    """
    settings = (
        dict(optimizer) if isinstance(optimizer, Mapping) else effective_optimizer_params(optimizer)
    )
    default_sharp, default_sigma = probe_estimates(curvature, m)
    sharp = sharpness or default_sharp
    sig = sigma or default_sigma
    for name, value in (("sigma", sig.value), ("GGN sharpness", sharp.value)):
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite {name} ({value}) from the probe batch")
    n = int(n)
    m = default_sigma.n
    b = min(max(float(batch_size), 1.0), float(n))
    momentum = min(float(settings.get("momentum") or 0.0), 0.999999)
    rho = settings.get("sam_rho")
    alpha = (
        1.0
        if rho is None
        else sam_alpha(mean_grad_sq, getattr(curvature, "gradient_noise_scale", None), max(m, 1))
    )
    settings = {**settings, "momentum": momentum, "sam_alpha": alpha}
    # Weight decay wd adds wd * I to the Hessian of the regularised loss.
    lam = max(sharp.value, 0.0) + float(settings.get("weight_decay") or 0.0)
    lr = float(settings["lr"])
    metrics = _curvature_metrics(curvature, sharp, sig, m)
    report = None
    if lr > 0:
        report = stability_report(
            lam, max(sig.value, 1.0), lr, b, n, momentum=momentum, sam_rho=rho, sam_alpha=alpha
        )
        metrics.update(_report_metrics(report))
    else:  # learning rate 0 (warm-up): only the critical learning rate means something
        metrics["stability/critical_lr"] = critical_lr(
            lam, max(sig.value, 1.0), b, n, momentum=momentum, sam_rho=rho, sam_alpha=alpha
        )
    out = Assessment(report, metrics, settings, b, n, sharp, sig)
    if report is not None and (mean_square_rate or lyapunov):
        metrics.update(
            linear_dynamics(
                curvature, out, mean_square_rate=mean_square_rate, lyapunov=lyapunov, seed=seed
            )
        )
    if lookahead is not None and lr > 0:
        metrics["stability/blowup_lr"] = float(lookahead.blowup_lr)
    gns = getattr(curvature, "gradient_noise_scale", None)
    if gns is not None and math.isfinite(float(gns)):
        metrics["noise/gradient_noise_scale"] = float(gns)
    metrics["probe/size"] = float(m)
    return out


def _curvature_metrics(curv: Any, sharp: Estimate, sig: Estimate, m: int) -> dict[str, float]:
    stats = curv.stats
    metrics: dict[str, float] = {
        "coherence/sigma": float(sig.value),
        "coherence/sigma_n": float(sig.n),
    }
    if math.isfinite(sig.stderr):
        metrics["coherence/sigma_stderr"] = float(sig.stderr)
    metrics["coherence/sigma_probe"] = float(stats.sigma)
    metrics["coherence/lambda_S"] = float(stats.lambda_S)
    metrics["coherence/max_sample_sharpness"] = float(stats.max_sample_sharpness)
    hessian = getattr(curv, "hessian_sharpness", None)
    if hessian is not None and math.isfinite(float(hessian)):
        metrics["sharpness/hessian"] = float(hessian)
    metrics["sharpness/ggn"] = float(sharp.value)
    metrics["sharpness/samples"] = float(sharp.n)
    return metrics


def _report_metrics(report: StabilityReport) -> dict[str, float]:
    return {
        "stability/gd_threshold": report.gd_threshold,
        "stability/theorem1_threshold": report.theorem1_threshold,
        "stability/theorem2_bound": report.theorem2_bound,
        "stability/margin": report.margin,
        "stability/critical_lr": report.critical_lr,
        "stability/critical_batch_size": report.critical_batch_size,
    }


def linear_dynamics(
    curvature: Any,
    assessment: Assessment,
    *,
    mean_square_rate: bool = False,
    lyapunov: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """rho(T), gamma and the typical critical lr of the linearized dynamics at the report's
    learning rate, batch size, momentum and SAM settings; empty without the probe's Gram or
    at learning rate 0."""
    gram = getattr(curvature, "gram", None)
    if gram is None or assessment.report is None:
        return {}
    s = assessment.settings
    common = (assessment.report.lr, assessment.batch_size, assessment.n)
    dyn = (float(s["momentum"] or 0.0), s.get("sam_rho"), float(s["sam_alpha"] or 1.0))
    out: dict[str, float] = {}
    if mean_square_rate:
        rate = _mean_square_rate(gram, *common, *dyn)
        if rate is not None:
            out["stability/mean_square_rate"] = rate
    if lyapunov:
        out.update(_lyapunov_metrics(gram, *common, *dyn, seed))
    return out


def _mean_square_rate(
    gram: torch.Tensor,
    lr: float,
    batch_size: float,
    n: int,
    momentum: float,
    sam_rho: float | None,
    sam_alpha: float,
) -> float | None:
    """rho(T) from :mod:`torch_coherence.dynamics` (with momentum and SAM), when available."""
    try:
        from ..dynamics import mean_square_rate
    except ImportError:
        return None
    value = mean_square_rate(
        gram, lr, batch_size, n=n, momentum=momentum, sam_rho=sam_rho, sam_alpha=sam_alpha
    )
    value = float(getattr(value, "rate", value))
    return value if math.isfinite(value) else None


def _lyapunov_metrics(
    gram: torch.Tensor,
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
    examples (:func:`torch_coherence.lyapunov_exponent`).
    """
    from ..dynamics import LyapunovPrecisionWarning, critical_lr_typical, lyapunov_exponent
    from ..dynamics.curvature_space import as_coefficient_curvature

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
            # only the central root is logged: no band search (0.40 s against 0.61 s with
            # it, benchmarks/bench_dynamics.py)
            c = critical_lr_typical(
                cc, batch_size, n, rel_tol=TYPICAL_LR_REL_TOL, band=False, **common
            )
        except (ValueError, RuntimeError, ArithmeticError):
            return out
    if math.isfinite(c.lr) and c.lr > 0:
        out["stability/typical_critical_lr"] = float(c.lr)
    return out
