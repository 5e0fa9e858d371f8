"""TensorBoard extras shared by the callback and the monitor (SummaryWriter duck-typed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..theory import StabilityReport

__all__ = [
    "LAYOUT",
    "MARGIN_LIMIT_TAG",
    "add_layout",
    "add_phase_plane",
    "add_scalars",
    "add_warnings",
    "is_writer",
]

#: Constant 1.0 logged next to the margin so the custom-scalars "Margin" chart shows a band.
MARGIN_LIMIT_TAG = "stability/margin_limit"

#: Custom-scalars layout: sharpness against its thresholds in one chart, margin with a band.
LAYOUT = {
    "torch-coherence": {
        "sharpness vs thresholds": [
            "Multiline",
            [
                "sharpness/ggn",
                "sharpness/hessian",
                "stability/gd_threshold",
                "stability/theorem1_threshold",
                "stability/theorem2_bound",
            ],
        ],
        "margin (mean-square divergence above 1)": [
            "Margin",
            ["stability/margin", "stability/margin", MARGIN_LIMIT_TAG],
        ],
        "coherence": ["Multiline", ["coherence/sigma"]],
        "critical learning rate": [
            "Multiline",
            ["stability/critical_lr", "stability/typical_critical_lr"],
        ],
        "Lyapunov exponent (typical run diverges above 0)": [
            "Multiline",
            ["stability/lyapunov"],
        ],
        "critical batch size": ["Multiline", ["stability/critical_batch_size"]],
    }
}


def is_writer(obj: Any) -> bool:
    """Whether ``obj`` looks like a :class:`torch.utils.tensorboard.SummaryWriter`."""
    return all(hasattr(obj, a) for a in ("add_scalar", "add_text", "add_image"))


def add_layout(writer: Any) -> None:
    """Write the custom-scalars layout (once per run directory is enough)."""
    if hasattr(writer, "add_custom_scalars"):
        writer.add_custom_scalars(LAYOUT)


def add_scalars(writer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Each metric as a scalar, plus the margin band's constant."""
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    if "stability/margin" in metrics:
        writer.add_scalar(MARGIN_LIMIT_TAG, 1.0, step)


def add_warnings(writer: Any, messages: tuple[str, ...], step: int) -> None:
    """Warnings as text summaries under ``coherence/warnings``."""
    for msg in messages:
        writer.add_text("coherence/warnings", msg, step)


def add_phase_plane(
    writer: Any, history: list[dict[str, Any]], report: StabilityReport | None, step: int
) -> None:
    """The (B, eta) phase-plane figure as an image under ``coherence/phase_plane``."""
    if report is None:
        return
    from ..plotting import figure_to_array, phase_plane_figure

    image = figure_to_array(phase_plane_figure(history, report))
    writer.add_image("coherence/phase_plane", image, step, dataformats="HWC")
