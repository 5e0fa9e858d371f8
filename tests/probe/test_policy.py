"""Verdicts, categories, actions and the texts: BlowupWarning only for a predicted blow-up,
LinearInstabilityWarning for the linear criteria, the edge of stability once, lr = 0."""

from __future__ import annotations

import math
import pathlib
import warnings
from types import SimpleNamespace

import pytest
import torch
from probe.fakes import SHARP, SIGMA, B, N, ScriptedLookahead, collect, sgd
from probe.fakes import scripted_probe as _probe
from torch import nn

import torch_coherence
from torch_coherence import BlowupWarning, CoherenceWarning, LinearInstabilityWarning
from torch_coherence.probe import messages
from torch_coherence.theory import critical_lr, stability_report


def _crit() -> float:
    return critical_lr(SHARP, SIGMA, B, N)


def test_categories_are_public_and_nested() -> None:
    assert issubclass(BlowupWarning, CoherenceWarning)
    assert issubclass(LinearInstabilityWarning, CoherenceWarning)
    assert not issubclass(LinearInstabilityWarning, BlowupWarning)
    assert torch_coherence.BlowupWarning is BlowupWarning


def test_blowup_warning_only_when_the_lookahead_blows_up() -> None:
    lr = 2 * _crit()  # linearly unstable by Theorem 1
    calm = _probe(lookahead_module=ScriptedLookahead(blowup_lr=4 * lr))
    seen: list = []
    res = calm.run(nn.Linear(3, 2), sgd(lr), B, warn=collect(seen))
    assert [c for _, c in seen] == [LinearInstabilityWarning]
    assert res.metrics["stability/blowup_lr"] == pytest.approx(4 * lr)
    assert not res.stop
    hot = _probe(lookahead_module=ScriptedLookahead(blowup_lr=lr))
    with pytest.warns(BlowupWarning, match="predicted to blow up at learning rate") as rec:
        res = hot.run(nn.Linear(3, 2), sgd(lr), B)
    assert res.metrics["stability/blowup_lr"] == pytest.approx(lr)
    blowups = [w for w in rec if w.category is BlowupWarning]
    assert len(blowups) == 1 and "5 real optimizer steps" in str(blowups[0].message)
    # stable linearly but the lookahead blows up: the blow-up alone
    lone = _probe(lookahead_module=ScriptedLookahead(blowup_lr=0.5 * _crit()))
    seen = []
    lone.run(nn.Linear(3, 2), sgd(0.5 * _crit()), B, warn=collect(seen))
    assert [c for _, c in seen] == [BlowupWarning]


def test_blowup_warning_once_per_crossing() -> None:
    lr = 0.5 * _crit()
    la = ScriptedLookahead(blowup_lr=lr)
    probe = _probe(lookahead_module=la)
    seen: list = []
    for blowup_lr in (lr, lr, 10 * lr, lr):
        la.blowup_lr = blowup_lr
        probe.count_step()
        probe.run(nn.Linear(3, 2), sgd(lr), B, warn=collect(seen))
    assert [c for _, c in seen] == [BlowupWarning, BlowupWarning]


def test_on_unstable_acts_on_the_blowup_prediction_by_default() -> None:
    lr = 2 * _crit()
    probe = _probe(on_unstable="stop", lookahead_module=ScriptedLookahead(blowup_lr=4 * lr))
    assert not probe.run(nn.Linear(3, 2), sgd(lr), B, warn=collect([])).stop
    probe = _probe(on_unstable="stop", lookahead_module=ScriptedLookahead(blowup_lr=lr))
    assert probe.run(nn.Linear(3, 2), sgd(lr), B, warn=collect([])).stop
    linear = _probe(on_unstable="stop", act_on="linear", lookahead_module=ScriptedLookahead())
    assert linear.run(nn.Linear(3, 2), sgd(lr), B, warn=collect([])).stop
    opt = sgd(lr)
    adjust = _probe(on_unstable="adjust_lr", lookahead_module=ScriptedLookahead(blowup_lr=lr))
    seen: list = []
    res = adjust.run(nn.Linear(3, 2), opt, B, warn=collect(seen))
    assert res.new_lr == pytest.approx(0.5 * lr) == opt.param_groups[0]["lr"]
    assert "lookahead blow-up learning rate" in seen[-1][0]
    with pytest.raises(ValueError, match="act_on"):
        _probe(act_on="gamma")


def test_no_blowup_prediction_without_a_lookahead() -> None:
    probe = _probe(on_unstable="stop", lookahead=False, lookahead_module=None)
    res = probe.run(nn.Linear(3, 2), sgd(2 * _crit()), B, warn=collect([]))
    assert "stability/blowup_lr" not in res.metrics and not res.stop


def test_a_failing_lookahead_is_noted_once_and_the_probe_stands() -> None:
    class Broken(ScriptedLookahead):
        def lookahead(self, *args, **kwargs):
            raise TypeError("cannot copy")

    probe = _probe(lookahead_module=Broken())
    seen: list = []
    for _ in range(2):
        probe.count_step()
        res = probe.run(nn.Linear(3, 2), sgd(0.5 * _crit()), B, warn=collect(seen))
        assert res.error is None and "stability/margin" in res.metrics
    assert len(seen) == 1 and "lookahead" in seen[0][0] and "cannot copy" in seen[0][0]


def _falling(probe, start: float = 2.0) -> None:
    for i in range(40):
        probe.count_step()
        probe.observe(start - 0.01 * i, None)


def test_edge_of_stability_is_said_once() -> None:
    """Full batch (B = n: no stochastic term), sharpness 3% above 2/lr, loss falling: one
    note, no LinearInstabilityWarning; without a falling loss the linear warning."""
    lr = 2.0 * 1.03 / SHARP
    probe = _probe(dataset_size=64, margin_warning=None)
    _falling(probe)
    seen: list = []
    for _ in range(3):
        probe.count_step()
        probe.run(nn.Linear(3, 2), sgd(lr), 64, warn=collect(seen))
    assert [c for _, c in seen] == [CoherenceWarning]
    assert "at the edge of stability" in seen[0][0] and "said once" in seen[0][0]
    rising = _probe(dataset_size=64, margin_warning=None)
    _falling(rising, start=-1.0)  # a loss rising: -1.0, -1.01, ... reversed below
    rising.schedule.losses.reverse()
    seen = []
    rising.run(nn.Linear(3, 2), sgd(lr), 64, warn=collect(seen))
    assert [c for _, c in seen] == [LinearInstabilityWarning]
    far = _probe(dataset_size=64, margin_warning=None)
    _falling(far)
    seen = []
    far.run(nn.Linear(3, 2), sgd(2 * lr), 64, warn=collect(seen))  # sharpness 2x the bound
    assert [c for _, c in seen] == [LinearInstabilityWarning]


def test_learning_rate_zero_is_reported_as_such() -> None:
    probe = _probe(on_unstable="raise")
    seen: list = []
    for _ in range(2):
        probe.count_step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no division by zero anywhere
            res = probe.run(nn.Linear(3, 2), sgd(0.0), B, warn=collect(seen))
        assert res.error is None and res.report is None and not res.raise_error
        assert res.metrics["stability/critical_lr"] == pytest.approx(_crit())
        assert "stability/margin" not in res.metrics and "stability/blowup_lr" not in res.metrics
    assert len(seen) == 1 and "learning rate is 0" in seen[0][0]
    assert "failed" not in seen[0][0] and seen[0][1] is CoherenceWarning
    probe.count_step()
    res = probe.run(nn.Linear(3, 2), sgd(0.5 * _crit()), B, warn=collect(seen))
    assert res.metrics["stability/margin"] == pytest.approx(0.5)
    assert len(probe.history) == 3 and "lr" not in probe.history[0]


def _report(lr: float, b: float, n: int = N, sharp: float = SHARP, sigma: float = SIGMA):
    return stability_report(sharp, sigma, lr, b, n)


def test_critical_batch_size_below_one_reads_any_batch_size() -> None:
    rep = _report(lr=1e-3, b=B)
    assert rep.critical_batch_size < 1
    text = messages.batch_advice(rep)
    assert "any batch size" in text and "raise the batch size" not in text


def test_never_advises_a_batch_size_above_n() -> None:
    for lr in (0.5 * _crit(), 1.01 * _crit(), 1.5 * _crit(), 3 * _crit(), 10.0):
        rep = _report(lr=lr, b=B)
        text = messages.batch_advice(rep)
        if rep.critical_batch_size >= N:
            assert "no batch size up to n = 1000 helps" in text, (lr, text)
        if "raise the batch size above" in text:
            b = float(text.rsplit("above ", 1)[1].split()[0])
            assert 1 <= b < N
    gd = _report(lr=1.1 * 2 / SHARP, b=B)  # above full-batch GD's bound
    assert math.isinf(gd.critical_batch_size)
    assert "no batch size up to n" in messages.batch_advice(gd)


def test_no_text_says_will_diverge() -> None:
    root = pathlib.Path(torch_coherence.__file__).parent / "probe"  # the probe says it all
    for path in root.rglob("*.py"):
        assert "will diverge" not in path.read_text(), path


def test_the_lookahead_steps_one_real_optimizer() -> None:
    from torch_coherence.probe.probe import _single_optimizer

    opt = sgd(0.1)
    wrapped = SimpleNamespace(_optimizer=opt)
    assert _single_optimizer(wrapped) is opt
    assert _single_optimizer(SimpleNamespace(optimizers=[wrapped])) is opt
    accelerated = SimpleNamespace(optimizer=opt)  # accelerate's AcceleratedOptimizer
    assert _single_optimizer(SimpleNamespace(_optimizer=accelerated)) is opt
    with pytest.raises(TypeError, match="one optimizer; this model trains with 2"):
        _single_optimizer(SimpleNamespace(optimizers=[opt, sgd(0.2)]))


class _TwoDraws(ScriptedLookahead):
    """The validated default: two draws of 10 steps; ``blows`` says which draw blows up at
    the current lr (the fake's outcome depends on the draw, as real batch orders do)."""

    DEFAULT_STEPS = (10, 10)

    def __init__(self, blows: tuple[bool, bool]) -> None:
        super().__init__()
        self.blows = list(blows)

    def lookahead(self, model, optimizer, loss, batches, *, multiples=(1.0,), **kw):
        lr = max(float(g["lr"]) for g in optimizer.param_groups)
        self.blowup_lr = lr if self.blows.pop(0) else 4 * lr
        return super().lookahead(model, optimizer, loss, batches, multiples=multiples, **kw)


@pytest.mark.parametrize(
    ("blows", "predicted"),
    [((False, False), False), ((True, False), True), ((False, True), True)],
)
def test_a_blowup_in_either_of_two_draws_predicts_one(blows, predicted) -> None:
    la = _TwoDraws(blows)
    lr = 0.5 * _crit()
    seen: list = []
    _probe(lookahead_module=la).run(nn.Linear(3, 2), sgd(lr), B, warn=collect(seen))
    runs = [c for c in la.calls if c[0] == "lookahead"]
    draws = [c for c in la.calls if c[0] == "draw"]
    assert [c[2] for c in runs] == [10, 10]  # two short runs of 10 steps
    assert [c[4] for c in runs] == [(1.0, 2.0, 4.0), (1.0,)]  # only the first brackets
    assert not torch.equal(draws[0][3], draws[1][3])  # independent batch draws
    assert (BlowupWarning in [c for _, c in seen]) is predicted
    if predicted:  # the message quotes the draw that blew up: 50 against 1, not 0.9
        (text,) = [t for t, c in seen if c is BlowupWarning]
        assert "from 1 to 50" in text
