"""The light probe: in place of a full probe that does not fit the budget, in the budget,
escalating to a full probe, harmless, and the tracked value of the real function."""

from __future__ import annotations

import math

import pytest
import torch
from probe.fakes import B, ScriptedEngine, ScriptedLookahead, collect, scripted_probe, sgd
from torch import nn

import torch_coherence.probe.schedule as S
from torch_coherence.curvature import TrackedSharpness, dataset_sharpness
from torch_coherence.probe import CoherenceProbe
from torch_coherence.probe import light as L


class VectorEngine(ScriptedEngine):
    """The scripted engine with a top eigenvector (of nn.Linear(3, 2): 8 parameters)."""

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        out.sharpness_vector = torch.ones(8, dtype=torch.float64)
        return out


class ScriptedTracker:
    """Returns the tracked value it is told (a list: one per call, the last repeated)."""

    def __init__(self, values=(1.0,), clock=None, cost=0.0) -> None:
        self.values, self.clock, self.cost, self.calls = list(values), clock, cost, []

    def __call__(self, model, loss, x, y, vector, **kw):
        if self.clock is not None:
            self.clock[0] += self.cost
        self.calls.append((x, kw))
        value = self.values[min(len(self.calls), len(self.values)) - 1]
        m = int(x.shape[0])
        q = torch.full((m,), value, dtype=torch.float64)
        return TrackedSharpness(value, 0.1, m, kw.get("n"), kw["kind"], q, self.cost)


def _fit(monkeypatch, steps, step_s, probe_s, light_s, lookahead_s=0.05, values=(1.0,), lr=0.01):
    """A fit on a fake clock with the default schedule."""
    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    tracker = ScriptedTracker(values, clock=clock, cost=light_s)
    probe = scripted_probe(
        VectorEngine(clock=clock, cost=probe_s),
        every_n_steps=100,
        max_overhead=0.03,
        lookahead_module=ScriptedLookahead(clock=clock, cost=lookahead_s),
        tracker=tracker,
    )
    opt, model = sgd(lr), nn.Linear(3, 2)
    probe.start()
    for _ in range(steps):
        if probe.due():
            probe.run(model, opt, B, warn=collect([]))
        clock[0] += step_s
        probe.count_step()
        probe.observe(1.0, lr)
    if probe.due():
        probe.run(model, opt, B, warn=collect([]))
    return probe, tracker


@pytest.mark.parametrize("probe_s", [0.3, 0.84, 3.0])
def test_ten_probes_in_three_percent_when_a_full_probe_costs_30_to_300_steps(
    monkeypatch, probe_s
) -> None:
    """1000 steps of 10 ms against a full probe of 30-300 training steps: the pre-flight
    probe and light probes of 1.5 steps in the budget, at least 10 probes, at most 3%."""
    probe, tracker = _fit(monkeypatch, 1000, 0.01, probe_s, 0.015)
    kinds = [h["kind"] for h in probe.history]
    assert kinds[0] == "preflight" and set(kinds[1:]) == {"light"}, kinds
    assert len(kinds) >= 10
    train = probe.schedule.training_seconds()
    assert probe.probe_seconds / train <= 0.03
    assert probe.probe_seconds == pytest.approx(0.015 * (len(kinds) - 1))
    # every light probe drew a fresh batch from the training set and logged its tags
    assert {"sharpness/tracked", "sharpness/tracked_stderr"} <= set(probe.history[1])
    assert all(kw["kind"] == "hessian" and kw["n"] == 8 for _, kw in tracker.calls)


def test_a_full_probe_that_fits_runs_in_full(monkeypatch) -> None:
    probe, tracker = _fit(monkeypatch, 1000, 0.01, 0.005, 0.015)
    kinds = [h["kind"] for h in probe.history]
    assert "light" not in kinds and kinds.count("scheduled") >= 9 and not tracker.calls


def test_sub_millisecond_steps_get_few_light_probes(monkeypatch) -> None:
    """1000 steps of 0.5 ms (0.5 s; budget 15 ms) with a light probe of 2 steps (1 ms):
    the budget, not every_n_steps, sets the rhythm."""
    probe, _ = _fit(monkeypatch, 1000, 0.0005, 0.025, 0.001)
    lights = [h for h in probe.history if h["kind"] == "light"]
    assert 5 <= len(lights) <= 10
    assert probe.probe_seconds / probe.schedule.training_seconds() <= 0.03


@pytest.mark.parametrize(
    ("values", "lr", "phrase"),
    [((3.0,), 0.6, "of the gradient-descent bound"), ((1.0, 3.4), 0.2, "above 1.5 x")],
)
def test_a_light_probe_escalates_to_a_triggered_full_probe(monkeypatch, values, lr, phrase):
    """lr x tracked (3.0 x 0.6 = 1.8 >= 0.8 x 2) or a rise above 1.5 x the last full
    probe's sharpness (2.2, the scripted Hessian sharpness) with lr x tracked (0.68) at least
    0.25 of the bound asks for a full probe at once; the ask counts against max_triggered."""
    probe, _ = _fit(monkeypatch, 1000, 0.01, 0.3, 0.015, values=values, lr=lr)
    kinds = [h["kind"] for h in probe.history]
    first = next(i for i, h in enumerate(probe.history) if "escalate" in h)
    assert phrase in probe.history[first]["escalate"] and kinds[first] == "light"
    assert kinds[first + 1] == "triggered"
    assert probe.history[first + 1]["trigger"] == probe.history[first]["escalate"]
    # at the next due(): integrations ask it after the next optimizer step
    assert probe.history[first + 1]["step"] == probe.history[first]["step"] + 1
    assert probe.schedule.triggered <= probe.max_triggered
    pending = probe.schedule.pending is not None  # asked by the last light probe of the fit
    assert kinds.count("triggered") + pending == probe.schedule.triggered >= 1


def test_escalation_rule() -> None:
    tracked = L.Tracked(torch.ones(2), "ggn", sharpness=10.0, step=0)
    settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    # bound 2 (1 + 0.9) = 3.8: 0.8 of it is 3.04, lr x value = 3.1
    assert "gradient-descent bound" in L.escalation(31.0, settings, tracked)
    assert L.escalation(14.9, settings, tracked) is None  # 1.49 x, lr x 14.9 = 1.49
    assert "above 1.5 x" in L.escalation(15.1, settings, tracked)
    # a rise far below the bound (lr x 15.1 = 0.151 < 0.25 x 3.8) asks for nothing
    assert L.escalation(15.1, {**settings, "lr": 0.01}, tracked) is None
    # a full probe that already saw lr x sharpness at 0.8 of the bound judged it: only a
    # further rise of 1.5 x asks again
    high = L.Tracked(torch.ones(2), "ggn", sharpness=31.0, step=0)
    assert L.escalation(32.0, settings, high) is None
    assert "above 1.5 x" in L.escalation(47.0, settings, high)
    assert (
        L.escalation(100.0, {**settings, "lr": 0.0}, L.Tracked(torch.ones(2), "ggn", 0.0, 0))
        is None
    )


def test_no_eigenvector_no_light_probe(monkeypatch) -> None:
    """Without a vector to track (the probe's own estimates with sharpness=None), a full
    probe that does not fit is postponed as before."""
    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    tracker = ScriptedTracker()
    probe = scripted_probe(
        ScriptedEngine(clock=clock, cost=0.3),
        every_n_steps=100,
        max_overhead=0.03,
        tracker=tracker,
    )
    opt, model = sgd(0.01), nn.Linear(3, 2)
    probe.start()
    for _ in range(1000):
        if probe.due():
            probe.run(model, opt, B, warn=collect([]))
        clock[0] += 0.01
        probe.count_step()
    assert [h["kind"] for h in probe.history] == ["preflight"] and not tracker.calls


def _data(n: int = 48) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def _slow_engine(clock):
    """The real engine, made to cost 100 s on the fake clock: full probes never fit."""
    from torch_coherence.curvature import measure_curvature

    def engine(*args, **kwargs):
        clock[0] += 100.0
        return measure_curvature(*args, **kwargs)

    return engine


def test_real_light_probe_is_the_training_sharpness_on_the_whole_set(monkeypatch) -> None:
    """With the data-set estimates (the default with a dataset) and a light batch of all n
    examples at unchanged weights, the tracked value is the training loss's sharpness."""
    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    data = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    loss = nn.CrossEntropyLoss()
    probe = CoherenceProbe(
        loss=loss,
        probe=data,
        probe_size=48,
        dataset_size=48,
        every_n_steps=5,
        max_overhead=0.5,
        criterion="theorem1",
        lookahead=False,
        engine=_slow_engine(clock),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights never move
    probe.start()
    probe.run(model, opt, 8, warn=collect([]))
    for _ in range(5):
        clock[0] += 1.0
        probe.count_step()
    assert probe.due()
    res = probe.run(model, opt, 8, warn=collect([]))
    assert res.kind == "light" and res.error is None, res.error
    full = dataset_sharpness(model, loss, data, kind="ggn", seed=0)
    assert res.metrics["sharpness/tracked"] == pytest.approx(full.value, rel=1e-4)
    assert res.metrics["sharpness/tracked_stderr"] == 0.0  # the whole population
    assert res.metrics["probe/size"] == 48
    assert probe.history[0]["sharpness/ggn"] == pytest.approx(full.value, rel=1e-6)


def test_a_failing_light_probe_is_reported_and_training_goes_on(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no forward-mode rule")

    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    probe = scripted_probe(
        VectorEngine(clock=clock, cost=0.3),
        every_n_steps=100,
        max_overhead=0.03,
        tracker=broken,
    )
    opt, model = sgd(0.01), nn.Linear(3, 2)
    probe.start()
    seen: list = []
    for _ in range(300):
        if probe.due():
            probe.run(model, opt, B, warn=collect(seen))
        clock[0] += 0.01
        probe.count_step()
    kinds = [h["kind"] for h in probe.history]
    assert kinds == ["preflight", "light"] and "error" in probe.history[1]
    assert "failed (RuntimeError: no forward-mode rule); training continues" in seen[-1][0]


@pytest.mark.filterwarnings("ignore")
def test_light_probes_leave_training_bit_identical(monkeypatch) -> None:
    """A plain loop (dropout, momentum) with light probes between the full ones: the same
    parameters, gradients, optimizer state and RNG states as without the probe."""
    import random

    import numpy as np

    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])

    def train(with_probe: bool):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)  # noqa: NPY002
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        data = _data(96)
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
        loss_fn = nn.CrossEntropyLoss()
        probe = None
        if with_probe:
            probe = CoherenceProbe(
                loss=loss_fn,
                probe=loader,
                probe_size=16,
                dataset_size=96,
                every_n_steps=4,
                max_overhead=0.5,
                lyapunov=False,
                criterion="theorem1",
                engine=_slow_engine(clock),
            )
            probe.attach(opt)
            probe.start()
        done = 0
        while done < 20:
            for x, y in loader:
                if probe is not None and probe.due():
                    probe.run(model, opt, 16, warn=lambda *_: None)
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                clock[0] += 1.0
                done += 1
                if done == 20:
                    break
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())  # noqa: NPY002
        return model, opt, rng, (probe.history if probe else [])

    plain, opt_a, rng_a, _ = train(False)
    probed, opt_b, rng_b, history = train(True)
    kinds = [h["kind"] for h in history]
    assert kinds[0] == "preflight" and kinds.count("light") >= 3, kinds
    assert all("error" not in h for h in history)
    assert model_equal(plain, probed) and torch.equal(rng_a[0], rng_b[0])
    assert rng_a[1] == rng_b[1] and np.array_equal(rng_a[2][1], rng_b[2][1])
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def model_equal(a: nn.Module, b: nn.Module) -> bool:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if not torch.equal(pa, pb) or not torch.equal(pa.grad, pb.grad):
            return False
    return a.training == b.training


def test_light_tags_are_conditional_and_described() -> None:
    from torch_coherence.probe import CONDITIONAL_TAGS, TAG_DESCRIPTIONS

    for tag in ("sharpness/tracked", "sharpness/tracked_stderr"):
        assert tag in CONDITIONAL_TAGS and TAG_DESCRIPTIONS[tag]
    assert math.isclose(L.GD_FRACTION, 0.8) and math.isclose(L.RISE_FACTOR, 1.5)


def test_draw_batch_is_seeded_and_the_same_for_every_kind_of_dataset() -> None:
    from torch_coherence.probe.data import Pairs

    data = _data(30)

    class Plain:  # a map-style dataset without tensors: collated item by item
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    dev = torch.device("cpu")
    x, y = L.draw_batch(data, 8, 3, 40, dev)
    for other in (Pairs(*data.tensors), Plain()):
        x2, y2 = L.draw_batch(other, 8, 3, 40, dev)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = L.draw_batch(data, 8, 3, 41, dev)  # another step: another batch
    assert x.shape == (8, 5) and not torch.equal(x, x3)
    rng = torch.get_rng_state()
    L.draw_batch(data, 8, 3, 40, dev)
    assert torch.equal(rng, torch.get_rng_state())


def test_guard_triggered_probes_skip_the_dataset_estimates_unless_they_fit(monkeypatch) -> None:
    """A loss spike's probe runs at once with the probe's own estimates (n = m) when the
    data-set ones do not fit the budget; a light probe's escalation gets the data-set ones;
    the tracked eigenvector survives a probe that computed none."""
    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    data = _data(40)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    probe = CoherenceProbe(
        loss=nn.CrossEntropyLoss(),
        probe=data,
        probe_size=16,
        dataset_size=40,
        criterion="theorem1",
        lookahead=False,
        engine=_slow_engine(clock),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.start()
    probe.run(model, opt, 8, warn=collect([]))
    assert probe.history[-1]["sharpness/samples"] == 40  # pre-flight: the training set's
    probe._dataset_seconds = 50.0  # as if the data-set estimates cost 50 s
    tracked = probe._tracked
    for value in [1.0] * 20:
        clock[0] += 0.01
        probe.count_step()
        probe.observe(value, 0.01)
    probe.count_step()
    assert probe.observe(10.0, 0.01)  # a spike: triggered
    probe.run(model, opt, 8, warn=collect([]))
    entry = probe.history[-1]
    assert entry["kind"] == "triggered" and entry["sharpness/samples"] == 16
    assert entry["coherence/sigma_n"] == 16 and probe._tracked is tracked
    assert probe.schedule.request(L.ESCALATION_PREFIX + " 9.9 above 1.5 x ...")
    probe.run(model, opt, 8, warn=collect([]))
    entry = probe.history[-1]
    assert entry["kind"] == "triggered" and entry["sharpness/samples"] == 40
    assert entry["coherence/sigma_n"] == 40
