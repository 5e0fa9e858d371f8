"""Figures of the probe's history: the (B, eta) phase plane and the curves over training.

Only this module and the integrations import matplotlib; figures are built with
:class:`matplotlib.figure.Figure` directly, so the user's pyplot backend is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .theory import StabilityReport, critical_lr, theorem2_bound

__all__ = ["curves_figure", "figure_to_array", "phase_plane_figure", "save_curves"]


def _boundaries(report: StabilityReport, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The critical learning rate and the Theorem 2 curve over batch sizes, from the theory.

    The solid curve is :func:`torch_coherence.theory.critical_lr` at each batch size with the
    report's momentum, SAM radius, normaliser and lambda_min (GD condition and Theorem 1,
    or Theorem C.8 with SAM): at B = ``report.batch_size`` it is ``report.critical_lr``.
    The dashed curve is the learning rate at which the sharpness meets the Theorem 2 bound
    (the bound scales as 1 / eta, so eta_2 = theorem2_bound(sigma, 1, B, n) / lambda_1),
    capped by the same full-batch limit.
    """
    lam, sigma, n = report.sharpness, report.sigma, report.n
    kw = dict(momentum=report.momentum, sam_rho=report.sam_rho, sam_alpha=report.sam_alpha,
              lambda_min=report.lambda_min)  # fmt: skip
    crit = np.array([critical_lr(lam, sigma, float(b), n, **kw) for b in batch])
    gd = critical_lr(lam, sigma, float(n), n, **kw)  # B = n: the full-batch limit alone
    t2 = np.array([min(gd, theorem2_bound(sigma, 1.0, float(b), n) / lam) for b in batch])
    return crit, t2


def phase_plane_figure(history: Sequence[dict[str, Any]], report: StabilityReport) -> Figure:
    """The (batch size, learning rate) plane with the divergence boundary of ``report``.

    The solid curve is the learning rate above which the linearized dynamics provably
    diverge in mean square (:func:`torch_coherence.critical_lr`: GD condition and Theorem 1
    of paper 000, Theorem C.8 of paper 002 with SAM, the report's momentum; for the current
    sharpness, sigma and n), so at the current batch size it passes through
    ``report.critical_lr``; the dashed curve is the Theorem 2 bound. The trajectory holds
    the (B, eta) of every past probe, the crosses the critical learning rate at each.

    Args:
        history: probe history entries with ``batch_size``, ``lr`` and
            ``stability/critical_lr`` (see :attr:`CoherenceProbe.history`).
        report: the latest stability report (the curves and the current point).
    """
    fig = Figure(figsize=(5.5, 4.2), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    if report.sharpness > 0:
        batch = np.unique(np.append(np.geomspace(1.0, float(report.n), 200), report.batch_size))
        crit, t2 = _boundaries(report, batch)
        ax.plot(batch, crit, "C3-", label="divergence (Thm 1 / GD)")
        ax.plot(batch, t2, "C3--", lw=1, label="Theorem 2 bound")
        top = np.where(np.isfinite(crit), crit, np.nan)
        ax.fill_between(batch, top, np.nanmax(top) * 10, color="C3", alpha=0.08)
    past = [h for h in history if "lr" in h and "batch_size" in h]
    if past:
        ax.plot([h["batch_size"] for h in past], [h["lr"] for h in past], "C0.-", alpha=0.6)
        crits = [(h["batch_size"], h.get("stability/critical_lr", math.inf)) for h in past]
        crits = [(b, c) for b, c in crits if math.isfinite(c)]
        if crits:
            ax.plot(*zip(*crits, strict=True), "C3x", alpha=0.5, label="critical lr at probes")
    ax.plot([report.batch_size], [report.lr], "C0o", ms=8, label="current (B, lr)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("learning rate")
    ax.set_title(
        f"sharpness {report.sharpness:.3g}, sigma {report.sigma:.3g}, n = {report.n}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def curves_figure(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Sharpness against its thresholds, the margin and sigma over optimizer steps."""
    fig = Figure(figsize=(10, 3.4), dpi=90)
    axes = [fig.add_subplot(1, 3, i) for i in (1, 2, 3)]
    ok = [h for h in history if "stability/margin" in h]
    steps = [h["step"] for h in ok]

    def series(tag: str) -> list[float]:
        return [h.get(tag, math.nan) for h in ok]

    for tag, style in (
        ("sharpness/ggn", "C0-"),
        ("sharpness/hessian", "C2-"),
        ("stability/gd_threshold", "k--"),
        ("stability/theorem1_threshold", "C3-"),
        ("stability/theorem2_bound", "C3:"),
    ):
        if any(math.isfinite(v) for v in series(tag)):
            axes[0].plot(steps, series(tag), style, label=tag.split("/")[1])
    axes[0].set_yscale("log")
    axes[0].set_title("sharpness vs thresholds", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, series("stability/margin"), "C1.-")
    axes[1].axhline(1.0, color="C3", lw=1)
    axes[1].set_title("margin (mean-square divergence above 1)", fontsize=9)
    axes[2].plot(steps, series("coherence/sigma"), "C4.-")
    axes[2].set_title("coherence sigma", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Save :func:`curves_figure` as a PNG and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = curves_figure(history, title)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
