"""The schedule: pre-flight probe, the three triggers and their bound, the time budget."""

from __future__ import annotations

import math

import pytest
import torch
from probe.fakes import B, ScriptedEngine, ScriptedLookahead, collect, scripted_probe, sgd
from torch import nn

import torch_coherence.probe.schedule as S


def test_preflight_probe_runs_before_the_first_optimizer_step() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = scripted_probe(every_n_steps=5)
    probe.attach(opt)
    probe.start()
    seen_steps = []
    for _ in range(11):
        if probe.due():
            seen_steps.append((probe.steps, probe.schedule.kind))
            probe.run(model, opt, B, warn=collect([]))
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    probe.detach()
    assert seen_steps == [(0, "preflight"), (5, "scheduled"), (10, "scheduled")]
    assert probe.history[0]["kind"] == "preflight" and probe.history[0]["step"] == 0
    # the pre-flight probe runs the lookahead whatever the budget
    assert "stability/blowup_lr" in probe.history[0]


def test_start_at_resume_probes_before_the_next_step() -> None:
    probe = scripted_probe(every_n_steps=50)
    for _ in range(7):
        probe.count_step()
    fresh = scripted_probe(every_n_steps=50)
    fresh.load_state_dict(probe.state_dict())
    assert not fresh.due()
    fresh.start()
    assert fresh.due() and fresh.next_probe_step == 7
    res = fresh.run(nn.Linear(3, 2), sgd(0.01), B, warn=collect([]))
    assert res.kind == "preflight" and res.step == 7 and not fresh.due()
    assert fresh.next_probe_step == 50  # the grid is unchanged by the pre-flight probe


def _settled(probe, losses=(1.0,) * 20, lr=0.01) -> None:
    probe.run(nn.Linear(3, 2), sgd(lr), B, warn=collect([]))  # sets the lr reference
    for value in losses:
        probe.count_step()
        assert not probe.observe(value, lr)


@pytest.mark.parametrize("bad", [math.nan, math.inf, torch.tensor(float("nan"))])
def test_non_finite_loss_triggers_at_once(bad) -> None:
    probe = scripted_probe(every_n_steps=1000)
    _settled(probe)
    probe.count_step()
    assert probe.observe(bad, 0.01) and probe.due()
    res = probe.run(nn.Linear(3, 2), sgd(0.01), B, warn=collect([]))
    assert res.kind == "triggered" and "non-finite" in res.trigger
    assert probe.history[-1]["trigger"] == res.trigger
    probe.count_step()
    assert not probe.observe(bad, 0.01)  # cool-down after a loss trigger
    assert probe.next_probe_step == 1000


def test_loss_spike_over_the_running_median_triggers() -> None:
    probe = scripted_probe(every_n_steps=1000)
    _settled(probe, losses=[1.0 + 0.01 * i for i in range(20)])
    probe.count_step()
    assert not probe.observe(torch.tensor(2.9), 0.01)  # below 3 x the median 1.1
    probe.count_step()
    assert probe.observe(torch.tensor(3.5), 0.01)
    res = probe.run(nn.Linear(3, 2), sgd(0.01), B, warn=collect([]))
    assert "above 3 x its running median" in res.trigger
    # too few losses for a median: no spike trigger
    young = scripted_probe(every_n_steps=1000)
    _settled(young, losses=[1.0] * (S.MIN_LOSSES - 1))
    young.count_step()
    assert not young.observe(100.0, 0.01)


def test_a_converged_fits_small_spikes_do_not_trigger() -> None:
    """3 x the running median is not enough far below the fit's starting loss: the spike
    must also reach SPIKE_FLOOR (0.5) x the median of the fit's first losses."""
    probe = scripted_probe(every_n_steps=1000)
    probe.start()
    _settled(probe, losses=[2.0] * 10 + [0.02] * 60)  # start loss 2.0, converged at 0.02
    probe.count_step()
    assert probe.schedule.start_loss == 2.0
    assert not probe.observe(0.9, 0.01)  # 45 x the median, but below 0.5 x 2.0
    probe.count_step()
    assert probe.observe(1.1, 0.01)


def test_a_spike_within_the_windows_batch_noise_does_not_trigger() -> None:
    """Above 3 x the median and the floor, but not above SPIKE_OVER_MAX (2) x the largest
    loss of the window: the batch noise of a small batch, not a spike."""
    probe = scripted_probe(every_n_steps=1000)
    probe.start()
    noisy = [1.0, 1.0, 1.0, 1.0, 4.0] * 10  # median 1.0, isolated batches at 4x
    _settled(probe, losses=noisy)
    probe.count_step()
    assert not probe.observe(5.0, 0.01)  # 5x the median, below 2 x the window's 4.0
    probe.count_step()
    assert probe.observe(8.5, 0.01)


def test_learning_rate_change_triggers() -> None:
    probe = scripted_probe(every_n_steps=1000)
    _settled(probe, lr=0.1)
    probe.count_step()
    assert not probe.observe(1.0, 0.19) and not probe.observe(1.0, 0.051)
    assert probe.observe(1.0, 0.21)
    res = probe.run(nn.Linear(3, 2), sgd(0.21), B, warn=collect([]))
    assert "from 0.1 to 0.21" in res.trigger
    probe.count_step()
    assert not probe.observe(1.0, 0.21)  # the reference moved with the probe
    assert probe.observe(1.0, 0.1)  # halving (and a bit) counts as well


def test_warm_up_end_triggers() -> None:
    probe = scripted_probe(every_n_steps=1000)
    _settled(probe, lr=0.0)
    probe.count_step()
    assert not probe.observe(1.0, 0.0) and probe.observe(1.0, 1e-4)


def test_triggers_are_bounded_per_fit_and_outside_the_budget() -> None:
    probe = scripted_probe(every_n_steps=1000, max_triggered=2, max_overhead=0.5)
    probe.start()
    _settled(probe)
    fired = 0
    for _ in range(5):
        probe.count_step()
        if probe.observe(1.0, 10.0 ** (fired + 1)):
            fired += 1
            probe.run(nn.Linear(3, 2), sgd(10.0**fired), B, warn=collect([]))
    assert fired == 2
    assert probe.probe_seconds == 0.0 and probe.schedule.outside_seconds > 0
    probe.start()  # a new fit: a new allowance
    probe.run(nn.Linear(3, 2), sgd(0.01), B, warn=collect([]))
    probe.count_step()
    assert probe.observe(1.0, 1.0)


def _fit(monkeypatch, steps: int, step_s: float, probe_s: float, lookahead_s: float):
    """A fit on a fake clock with the default schedule; (probes, budgeted, total, train)."""
    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    probe = scripted_probe(
        ScriptedEngine(clock=clock, cost=probe_s),
        every_n_steps=100,  # the defaults, spelled out (a test below checks them)
        max_overhead=0.03,
        lookahead_module=ScriptedLookahead(clock=clock, cost=lookahead_s),
    )
    opt, model = sgd(0.01), nn.Linear(3, 2)
    probe.start()
    for _ in range(steps):
        if probe.due():
            probe.run(model, opt, B, warn=collect([]))
        clock[0] += step_s
        probe.count_step()
        probe.observe(1.0, 0.01)
    if probe.due():
        probe.run(model, opt, B, warn=collect([]))
    train = probe.schedule.training_seconds()
    total = probe.probe_seconds + probe.schedule.outside_seconds
    return len(probe.history), probe.probe_seconds, total, train


def test_defaults_are_the_ones_documented() -> None:
    import inspect

    from torch_coherence.probe import CoherenceProbe

    params = inspect.signature(CoherenceProbe).parameters
    assert params["every_n_steps"].default == 100 and params["max_overhead"].default == 0.03


@pytest.mark.parametrize("probe_s", [0.005, 0.025])
def test_default_schedule_ten_probes_in_three_percent(monkeypatch, probe_s) -> None:
    """1000 steps of 10 ms: the pre-flight probe and 10 scheduled ones (at most 3% of the
    training time for the scheduled ones), when a probe costs up to 2.5 steps."""
    probes, budgeted, total, train = _fit(monkeypatch, 1000, 0.01, probe_s, 0.05)
    assert probes >= 10, probes
    assert budgeted / train <= 0.03
    # the pre-flight probe and its lookahead come on top
    assert total - budgeted == pytest.approx(probe_s + 0.05)


def test_sub_millisecond_steps_trade_probes_for_the_budget(monkeypatch) -> None:
    """1000 steps of 0.5 ms (0.5 s) against a 25 ms probe: the budget (15 ms) allows no
    scheduled probe in 1000 steps; 20000 steps (10 s) allow about 12."""
    probes, budgeted, _, train = _fit(monkeypatch, 1000, 0.0005, 0.025, 0.05)
    assert probes == 1 and budgeted == 0.0  # the pre-flight probe only
    probes, budgeted, _, train = _fit(monkeypatch, 20_000, 0.0005, 0.025, 0.05)
    assert 5 <= probes - 1 <= 12 and budgeted / train <= 0.03


def test_state_dict_keeps_the_triggers_and_reads_the_old_format() -> None:
    probe = scripted_probe(every_n_steps=50, max_triggered=3)
    probe.start()
    _settled(probe, lr=0.1)
    probe.count_step()
    assert probe.observe(math.nan, 0.1)
    probe.run(nn.Linear(3, 2), sgd(0.1), B, warn=collect([]))
    state = probe.state_dict()
    assert state["triggered"] == 1 and state["last_probe_lr"] == 0.1
    fresh = scripted_probe(every_n_steps=50, max_triggered=3)
    fresh.load_state_dict(state)
    assert fresh.armed == probe.armed and fresh.schedule.last_probe_lr == 0.1
    old = {"steps": 3, "last_probe_step": 3, "armed": [False, True, True], "history": []}
    fresh.load_state_dict(old)
    assert not fresh.armed.approach and fresh.armed.linear and fresh.next_probe_step == 4


def test_due_reads_no_clock_and_a_postponed_probe_measures_nothing(monkeypatch) -> None:
    """due() is the same on every DDP rank; the measuring rank postpones a probe that does
    not fit, and the postponement travels in the (broadcast) result."""
    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    engine = ScriptedEngine(clock=clock, cost=1.0)
    probe = scripted_probe(engine, every_n_steps=10, max_overhead=0.03)
    rank1 = scripted_probe(ScriptedEngine(), every_n_steps=10, max_overhead=0.03)
    probe.start()
    rank1.start()
    opt, model = sgd(0.01), nn.Linear(3, 2)
    for p in (probe, rank1):
        assert p.due()
    res = probe.measure(model, opt, B)
    for p in (probe, rank1):
        p.commit(res, opt, warn=collect([]))
    for _ in range(10):
        clock[0] += 0.01
        for p in (probe, rank1):
            p.count_step()
    assert probe.due() and rank1.due()
    calls = len(engine.calls)
    res = probe.measure(model, opt, B)
    assert res.kind == "postponed" and not res.metrics and len(engine.calls) == calls
    for p in (probe, rank1):
        p.commit(res, opt, warn=collect([]))
        assert not p.due() and p.next_probe_step == res.next_step > 1000
    assert len(probe.history) == len(rank1.history) == 1


def test_a_probe_after_a_non_finite_loss_says_training_blew_up() -> None:
    probe = scripted_probe(ScriptedEngine(FloatingPointError("non-finite output curvature")))
    probe.schedule.last_probe_lr = 0.01
    for value in [1.0] * 20:
        probe.count_step()
        probe.observe(value, 0.01)
    probe.count_step()
    assert probe.observe(math.inf, 0.01)
    seen: list = []
    res = probe.run(nn.Linear(3, 2), sgd(0.01), B, warn=collect(seen))
    assert res.error and "training has blown up: non-finite training loss inf" in seen[0][0]
    assert "failed" not in seen[0][0]
