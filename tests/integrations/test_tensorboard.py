"""The shared TensorBoard helper: readable tags, descriptions, notes for infinite values."""

from __future__ import annotations

import dataclasses
import glob
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.tensorboard import SummaryWriter

from torch_coherence.integrations.tensorboard import (
    MARGIN_LIMIT_TAG,
    NOTES_TAG,
    TensorBoardLog,
    describe,
    layout,
    readable_metrics,
)
from torch_coherence.probe import TAGS, CoherenceProbe


@pytest.fixture(scope="module")
def result():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    probe = CoherenceProbe(
        loss=nn.CrossEntropyLoss(),
        probe=TensorDataset(x, x[:, :3].argmax(1)),
        probe_size=16,
        dataset_size=48,
        max_overhead=None,
    )
    return probe.measure(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5), 8)


def _read(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(path / "events.*"))[0], size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_readable_values_are_the_reports_numbers(result) -> None:
    report = result.report
    scalars, non_finite = readable_metrics(result.metrics, report)
    # the lookahead ran (max_overhead=None) and no tested multiple of lr 0.3 blew up: its
    # blow-up lr is inf, a note rather than a scalar; everything else is finite
    assert result.lookahead is not None and not any(result.lookahead.blew_up)
    assert non_finite == {"stability/blowup_lr": math.inf}
    assert "stability/blowup_lr" not in scalars
    assert scalars["optimizer/lr"] == 0.3
    assert scalars["readable/gd_ratio"] == pytest.approx(report.sharpness / report.gd_threshold)
    # the GD threshold with momentum 0.5 is 2 (1 + 0.5) / lr: the ratio is lr lambda / 3
    assert scalars["readable/gd_ratio"] == pytest.approx(0.3 * report.sharpness / 3.0)
    assert scalars["readable/log10_margin"] == pytest.approx(math.log10(report.margin))
    assert scalars["readable/log10_lr_over_critical_lr"] == pytest.approx(
        math.log10(0.3 / report.critical_lr)
    )
    assert scalars["log10/sharpness/ggn"] == pytest.approx(
        math.log10(result.metrics["sharpness/ggn"])
    )
    assert scalars[MARGIN_LIMIT_TAG] == 1.0


def test_every_layout_chart_is_fed_and_every_tag_described(result) -> None:
    scalars, _ = readable_metrics(result.metrics, result.report)
    charts = layout()["torch-coherence"]
    for title, (_kind, tags) in charts.items():
        assert set(tags) & set(scalars), title  # optional tags (sharpness/hessian) aside
        for tag in tags:
            assert describe(tag) != tag, tag
    for tag in [*TAGS, *scalars]:
        assert describe(tag) != tag, tag


def test_infinite_values_become_a_note_not_a_gap(tmp_path, result) -> None:
    metrics = {**result.metrics, "stability/critical_batch_size": math.inf}
    infinite = dataclasses.replace(result, metrics=metrics)
    writer = SummaryWriter(str(tmp_path))
    log = TensorBoardLog(writer)
    for step in (1, 2):
        log.write_result(dataclasses.replace(infinite, step=step))
    log.write_result(dataclasses.replace(result, step=3))
    writer.close()
    acc = _read(tmp_path)
    events = acc.Scalars("stability/critical_batch_size")
    assert [e.step for e in events] == [3]  # inf never written as a scalar
    assert [e.step for e in acc.Scalars("coherence/sigma")] == [1, 2, 3]
    notes = acc.Tensors(f"{NOTES_TAG}/text_summary")
    # once per tag, when it turned infinite: the critical batch size, and the lookahead's
    # blow-up lr (inf throughout: none of its learning rates blew up)
    assert [e.step for e in notes] == [1, 1]
    texts = sorted(e.tensor_proto.string_val[0].decode() for e in notes)
    assert texts[0].startswith("stability/blowup_lr = inf at step 1 (not plotted")
    assert texts[1].startswith("stability/critical_batch_size = inf at step 1 (not plotted")
    for tag in acc.Tags()["scalars"]:
        assert acc.SummaryMetadata(tag).summary_description == describe(tag), tag
