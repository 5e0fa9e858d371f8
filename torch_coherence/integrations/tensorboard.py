"""TensorBoard output shared by the Lightning callback, the Trainer callback and the monitor.

A probe's metrics span orders of magnitude (Theorem 1's threshold in the thousands next to a
sharpness of 2; a critical batch size of 0.0002 or infinity), so besides the raw tags of
:data:`torch_coherence.probe.TAGS` this module writes *readable* ones:

* dimensionless curves against 1: ``readable/gd_ratio`` = sharpness / GD threshold
  (eta lambda_1 / 2 for plain SGD) next to the constant ``stability/margin_limit`` = 1;
* log10 values, whose line 0 is the boundary: ``readable/log10_margin`` and
  ``readable/log10_lr_over_<critical lr>`` for every ``stability/*_lr`` tag (the learning
  rate against each critical learning rate), and ``log10/<tag>`` for the sharpness, its
  thresholds, the critical learning rates and batch size, so that one chart of the
  custom-scalars layout holds quantities that differ by 10^4;
* ``optimizer/lr``, the learning rate the report used.

Infinite and NaN values are never written as scalars (TensorBoard would draw a gap): the
first time a tag turns non-finite a text note under ``coherence/notes`` says so, with the
tag's description. Every scalar carries its one-sentence description in its summary
metadata (``TAG_DESCRIPTIONS``, shown by TensorBoard's tooltip and read back by
:class:`~tensorboard.backend.event_processing.event_accumulator.EventAccumulator`).

Tags and descriptions are read from :data:`torch_coherence.probe.TAGS` and
:data:`~torch_coherence.probe.TAG_DESCRIPTIONS` at call time: a tag the probe adds is logged,
described and (when it matches a pattern above) given its readable twin without a change
here. The ratios only divide numbers the report already holds; no formula lives here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .. import probe as _probe

__all__ = [
    "MARGIN_LIMIT_TAG",
    "NonFiniteNotes",
    "NOTES_TAG",
    "WARNINGS_TAG",
    "PHASE_PLANE_TAG",
    "TensorBoardLog",
    "DescribedWriter",
    "describe",
    "is_coherence_tag",
    "is_writer",
    "layout",
    "readable_metrics",
]

#: Constant 1.0: the boundary drawn next to the margin and the GD ratio.
MARGIN_LIMIT_TAG = "stability/margin_limit"
#: Text tags: notes on non-finite values, the probe's warnings, and the phase-plane image.
NOTES_TAG = "coherence/notes"
WARNINGS_TAG = "coherence/warnings"
PHASE_PLANE_TAG = "coherence/phase_plane"

_LOG_PREFIXES = ("sharpness/",)
_LOG_TAGS = (
    "stability/gd_threshold",
    "stability/theorem1_threshold",
    "stability/theorem2_bound",
    "stability/critical_batch_size",
    "coherence/sigma",
    "optimizer/lr",
)

#: Descriptions of the tags this module derives (the probe's own are in TAG_DESCRIPTIONS).
DERIVED_DESCRIPTIONS: dict[str, str] = {
    MARGIN_LIMIT_TAG: "constant 1: the boundary of the margin and of the GD ratio",
    "optimizer/lr": "largest learning rate over the optimizer's param groups (the report's)",
    "readable/gd_ratio": (
        "sharpness / GD threshold = lr x sharpness / (2 (1 + momentum)): full-batch "
        "gradient descent diverges above 1"
    ),
    "readable/log10_margin": "log10 of stability/margin: Theorem 1 proves divergence above 0",
}


def is_writer(obj: Any) -> bool:
    """Whether ``obj`` looks like a :class:`torch.utils.tensorboard.SummaryWriter`."""
    return all(hasattr(obj, a) for a in ("add_scalar", "add_text", "add_image"))


def _critical_lr_tags(tags: Iterable[str]) -> list[str]:
    return [t for t in tags if t.startswith("stability/") and t.endswith("_lr")]


def _logged(tag: str) -> bool:
    return tag.startswith(_LOG_PREFIXES) or tag in _LOG_TAGS or tag in _critical_lr_tags([tag])


def describe(tag: str) -> str:
    """The one-sentence description of a tag (probe, derived, log10 or ratio tags)."""
    descriptions = {**_probe.TAG_DESCRIPTIONS, **DERIVED_DESCRIPTIONS}
    if tag in descriptions:
        return descriptions[tag]
    if tag.startswith("log10/"):
        return f"log10 of {tag[6:]}: {describe(tag[6:])}"
    if tag.startswith("readable/log10_lr_over_"):
        name = "stability/" + tag[len("readable/log10_lr_over_") :]
        return f"log10(lr / {name}): above 0 the lr exceeds it ({describe(name)})"
    return tag


def is_coherence_tag(tag: str) -> bool:
    """Whether ``tag`` is one this package writes (a probe tag or a readable twin)."""
    known = tag in _probe.TAGS or tag in _probe.TAG_DESCRIPTIONS or tag in DERIVED_DESCRIPTIONS
    return known or tag.startswith(("log10/", "readable/"))


def readable_metrics(
    metrics: Mapping[str, float], report: Any = None
) -> tuple[dict[str, float], dict[str, float]]:
    """The scalars to write for one probe, and the non-finite values left out.

    Args:
        metrics: a probe's metrics (tag -> value).
        report: its :class:`~torch_coherence.StabilityReport` (for the lr and the GD ratio),
            or ``None``.

    Returns:
        ``(scalars, non_finite)``: every finite metric plus the readable tags of the module
        docstring; and the metrics that were infinite or NaN (not plotted).
    """
    values = {t: float(v) for t, v in metrics.items()}
    if report is not None:
        values["optimizer/lr"] = float(report.lr)
        if report.gd_threshold > 0 and math.isfinite(report.gd_threshold):
            values["readable/gd_ratio"] = float(report.sharpness) / float(report.gd_threshold)
    scalars = {t: v for t, v in values.items() if math.isfinite(v)}
    non_finite = {t: v for t, v in values.items() if not math.isfinite(v)}
    if "readable/gd_ratio" in scalars or "stability/margin" in scalars:
        scalars[MARGIN_LIMIT_TAG] = 1.0
    margin = scalars.get("stability/margin")
    if margin is not None and margin > 0:
        scalars["readable/log10_margin"] = math.log10(margin)
    lr = scalars.get("optimizer/lr")
    for tag in _critical_lr_tags(values):
        crit = scalars.get(tag)
        if lr is not None and lr > 0 and crit is not None and crit > 0:
            scalars["readable/log10_lr_over_" + tag[len("stability/") :]] = math.log10(lr / crit)
    for tag, value in list(scalars.items()):
        if _logged(tag) and value > 0:
            scalars["log10/" + tag] = math.log10(value)
    return scalars, non_finite


def layout(prefix: str = "", tags: Iterable[str] | None = None) -> dict[str, Any]:
    """The custom-scalars layout (tab *Custom Scalars*, section *torch-coherence*).

    Args:
        prefix: prepended to every tag (the Hugging Face Trainer logs ``train/<tag>``).
        tags: the probe's tags (default :data:`torch_coherence.probe.TAGS`).
    """
    tags = list(_probe.TAGS if tags is None else tags)
    crit = _critical_lr_tags(tags)
    sharp = [t for t in tags if t.startswith("sharpness/")]
    thresholds = [t for t in _LOG_TAGS[:3] if t in tags]

    def p(names: Iterable[str]) -> list[str]:
        return [prefix + n for n in names]

    charts = {
        "GD ratio: lr x sharpness / (2 (1 + momentum)) against 1": [
            "Multiline",
            p(["readable/gd_ratio", MARGIN_LIMIT_TAG]),
        ],
        "log10 margin (Theorem 1 proves divergence above 0)": [
            "Multiline",
            p(["readable/log10_margin"]),
        ],
        "log10 lr / critical learning rates (above 0: lr above it)": [
            "Multiline",
            p("readable/log10_lr_over_" + t[len("stability/") :] for t in crit),
        ],
        "log10 lr against the critical learning rates": [
            "Multiline",
            p("log10/" + t for t in ["optimizer/lr", *crit]),
        ],
        "log10 sharpness against its thresholds": [
            "Multiline",
            p("log10/" + t for t in [*sharp, *thresholds]),
        ],
        "coherence sigma (log10)": ["Multiline", p(["log10/coherence/sigma"])],
        "log10 critical batch size (inf: see coherence/notes)": [
            "Multiline",
            p(["log10/stability/critical_batch_size"]),
        ],
    }
    if "stability/lyapunov" in tags:
        charts["Lyapunov exponent gamma (a typical run diverges above 0)"] = [
            "Multiline",
            p(["stability/lyapunov"]),
        ]
    return {"torch-coherence": charts}


def _summary(tag: str, value: float, description: str) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    meta = SummaryMetadata(
        display_name=tag,
        summary_description=description,
        plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"),
    )
    return Summary(value=[Summary.Value(tag=tag, simple_value=value, metadata=meta)])


def write_scalar(writer: Any, tag: str, value: float, step: int, description: str) -> None:
    """One scalar with its description in the summary metadata.

    ``torch.utils.tensorboard.SummaryWriter`` takes no description, so the summary is built
    here and handed to its file writer; other writers get a plain ``add_scalar``.
    """
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None:
        writer.add_scalar(tag, value, step)
        return
    file_writer().add_summary(_summary(tag, float(value), description), step)


class NonFiniteNotes:
    """Text notes for tags that turn infinite or NaN: one when a tag turns, not per probe."""

    def __init__(self) -> None:
        self._non_finite: set[str] = set()

    def __call__(self, non_finite: Mapping[str, float], step: int) -> list[str]:
        """The notes for this probe's non-finite values (see :func:`readable_metrics`)."""
        out = [
            f"{tag} = {value} at step {step} (not plotted until finite): {describe(tag)}"
            for tag, value in non_finite.items()
            if tag not in self._non_finite
        ]
        self._non_finite = set(non_finite)
        return out


class TensorBoardLog:
    """Everything one run writes to one ``SummaryWriter``: layout, scalars, notes, figures.

    Args:
        writer: a :class:`torch.utils.tensorboard.SummaryWriter` (or any object with
            ``add_scalar``, ``add_text``, ``add_image``).
        prefix: prepended to every tag (``"train/"`` under the Hugging Face Trainer).
    """

    def __init__(self, writer: Any, prefix: str = "") -> None:
        if not is_writer(writer):
            raise ValueError(f"writer must be a SummaryWriter, got {type(writer).__name__}")
        self.writer = writer
        self.prefix = prefix
        self._layout_written = False
        self.notes = NonFiniteNotes()

    def write_layout(self) -> None:
        """The custom-scalars layout, once."""
        if not self._layout_written and hasattr(self.writer, "add_custom_scalars"):
            self.writer.add_custom_scalars(layout(self.prefix))
        self._layout_written = True

    def write_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Scalars as given (already finite), each with its description."""
        for tag, value in scalars.items():
            write_scalar(self.writer, self.prefix + tag, value, step, describe(tag))

    def write_result(self, result: Any) -> None:
        """One :class:`~torch_coherence.probe.ProbeResult`: scalars, notes and warnings."""
        self.write_layout()
        scalars, non_finite = readable_metrics(result.metrics, result.report)
        self.write_scalars(scalars, result.step)
        for note in self.notes(non_finite, result.step):
            self.writer.add_text(self.prefix + NOTES_TAG, note, result.step)
        for msg in result.messages:  # a failed probe's message included
            self.writer.add_text(self.prefix + WARNINGS_TAG, msg, result.step)

    def write_phase_plane(self, history: list[dict[str, Any]], report: Any, step: int) -> None:
        """The (B, eta) phase-plane figure as an image (nothing before the first report)."""
        if report is None:
            return
        from ..plotting import figure_to_array, phase_plane_figure

        image = figure_to_array(phase_plane_figure(history, report))
        self.writer.add_image(self.prefix + PHASE_PLANE_TAG, image, step, dataformats="HWC")


class DescribedWriter:
    """A ``SummaryWriter`` proxy that adds descriptions to the probe's scalars.

    The Hugging Face ``TensorBoardCallback`` writes every logged value with a plain
    ``add_scalar``; wrapped in this proxy, the probe's tags (``<prefix><tag>``) go through
    :func:`write_scalar` with their description and non-finite values are dropped. Every
    other call and tag passes through unchanged.
    """

    def __init__(self, writer: Any, prefix: str) -> None:
        self._writer = writer
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def add_scalar(self, tag: str, value: Any, global_step: Any = None, *args: Any, **kw: Any):
        name = tag[len(self._prefix) :] if tag.startswith(self._prefix) else None
        if name is None or not is_coherence_tag(name):
            return self._writer.add_scalar(tag, value, global_step, *args, **kw)
        if math.isfinite(float(value)):
            write_scalar(self._writer, tag, float(value), global_step, describe(name))
        return None
