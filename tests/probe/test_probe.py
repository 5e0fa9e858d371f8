"""The shared probe: schedule, hyperparameters, report, hysteresis, actions, failures, state."""

from __future__ import annotations

import importlib
import math
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from probe.fakes import SHARP, SIGMA, B, N, ScriptedEngine
from torch import nn

from torch_coherence.optim import SAM
from torch_coherence.probe import (
    TAGS,
    CoherenceProbe,
    CoherenceProbeError,
    CoherenceWarning,
    LinearInstabilityWarning,
    UnstableTrainingError,
    effective_optimizer_params,
    sample_probe,
)
from torch_coherence.theory import critical_lr


def _probe(engine: ScriptedEngine, **kw) -> CoherenceProbe:
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    kw.setdefault("every_n_steps", 1)
    kw.setdefault("max_overhead", None)
    kw.setdefault("criterion", "theorem1")  # the scripted engine has no Gram for gamma
    kw.setdefault("lookahead", False)
    return CoherenceProbe(
        loss=nn.CrossEntropyLoss(), probe=data, dataset_size=N, engine=engine, **kw
    )


def _crit() -> float:
    return critical_lr(SHARP, SIGMA, B, N)


def _opt(lr: float, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=lr, **kw)


def test_metric_tags_and_values() -> None:
    probe = _probe(ScriptedEngine())
    res = probe.run(nn.Linear(3, 2), _opt(0.5 * _crit()), B)
    assert set(res.metrics) <= set(TAGS)
    # the scripted engine returns no Gram: no rho(T), no gamma
    lyap = {"stability/lyapunov", "stability/lyapunov_stderr", "stability/typical_critical_lr"}
    absent = {"stability/mean_square_rate", "stability/blowup_lr", "coherence/sigma_stderr"}
    light = {"sharpness/tracked", "sharpness/tracked_stderr"}  # light probes only
    expected = set(TAGS) - absent - lyap - light
    assert set(res.metrics) == expected
    assert res.metrics["stability/critical_lr"] == pytest.approx(_crit())
    assert res.metrics["stability/margin"] == pytest.approx(0.5)
    assert res.metrics["sharpness/hessian"] == pytest.approx(2.2)
    # today's sigma and sharpness are the probe's own: over its m = 8 examples
    assert res.metrics["coherence/sigma_n"] == 8 == res.metrics["sharpness/samples"]
    assert res.metrics["probe/size"] == 8
    assert res.metrics["coherence/sigma"] == res.metrics["coherence/sigma_probe"] == SIGMA


def test_reads_momentum_weight_decay_and_sam_rho() -> None:
    p = nn.Linear(3, 2).parameters()
    sam = SAM(p, torch.optim.SGD, rho=0.07, lr=0.3, momentum=0.9, weight_decay=1e-3)
    assert effective_optimizer_params(sam) == {
        "lr": 0.3,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "sam_rho": 0.07,
    }
    adam = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    assert effective_optimizer_params(adam)["sam_rho"] is None
    probe = _probe(ScriptedEngine())
    with pytest.warns(CoherenceWarning):
        res = probe.run(nn.Linear(3, 2), sam, B)
    assert res.report.sam_rho == 0.07 and res.report.momentum == 0.9
    assert res.report.sharpness == pytest.approx(SHARP + 1e-3)


def test_hysteresis_warns_once_per_crossing() -> None:
    probe = _probe(ScriptedEngine(), margin_warning=0.8)
    opt = _opt(0.5 * _crit())
    model = nn.Linear(3, 2)
    seen = []
    for factor in (0.5, 0.9, 0.95, 1.2, 1.3, 0.9, 1.4, 0.5, 0.85):
        opt.param_groups[0]["lr"] = factor * _crit()
        probe.count_step()
        res = probe.run(model, opt, B, warn=lambda text, category: seen.append(text))
        assert len(res.messages) <= 1
    kinds = ["dynamics at these weights are unstable" in m for m in seen]
    # approach at 0.9, unstable at 1.2; back at 0.9 (inside the band) nothing re-arms, so
    # 1.4 is silent; 0.5 re-arms both, 0.85 approaches again
    assert kinds == [False, True, False]
    assert "mean-square divergence of the linearized dynamics" in seen[1]
    assert len(probe.history) == 9
    # flapping around the boundary: one warning, not one per crossing of 1
    flap = _probe(ScriptedEngine(), margin_warning=0.8)
    seen = []
    for factor in (1.2, 0.95, 1.2, 0.9, 1.3, 0.7, 1.1):
        opt.param_groups[0]["lr"] = factor * _crit()
        flap.count_step()
        flap.run(model, opt, B, warn=lambda text, category: seen.append(text))
    assert sum("dynamics at these weights are unstable" in m for m in seen) == 2


def test_warning_text_names_numbers_and_fix() -> None:
    probe = _probe(ScriptedEngine())
    lr = 1.3 * _crit()
    with pytest.warns(LinearInstabilityWarning) as rec:
        probe.run(nn.Linear(3, 2), _opt(lr), B)
    msg = str(rec[0].message)
    rep = probe.last_report
    assert f"unstable at learning rate {lr:.3g}, batch size {B}" in msg
    assert "not necessarily divergence" in msg and "will diverge" not in msg
    fix = f"lower it below {rep.critical_lr:.3g} or raise the batch size above "
    assert fix + f"{rep.critical_batch_size:.0f}" in msg


def test_half_critical_is_silent() -> None:
    probe = _probe(ScriptedEngine())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.run(nn.Linear(3, 2), _opt(0.5 * _crit()), B)


def test_raise_stop_adjust() -> None:
    model = nn.Linear(3, 2)
    with pytest.warns(CoherenceWarning), pytest.raises(UnstableTrainingError) as err:
        _probe(ScriptedEngine(), on_unstable="raise", act_on="linear").run(
            model, _opt(2 * _crit()), B
        )
    assert err.value.report.unstable
    probe = _probe(ScriptedEngine(), on_unstable="stop", act_on="linear")
    with pytest.warns(CoherenceWarning):
        assert probe.run(model, _opt(2 * _crit()), B).stop
    opt = _opt(2 * _crit())
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": _crit()})
    probe = _probe(ScriptedEngine(), on_unstable="adjust_lr", lr_safety=0.5, act_on="linear")
    with pytest.warns(CoherenceWarning) as rec:
        res = probe.run(model, opt, B)
    assert any("lowered the learning rate" in str(w.message) for w in rec)
    assert res.new_lr == pytest.approx(0.5 * _crit())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * _crit())
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * _crit())
    # the probe's own 4x lowering is not an lr change the guard triggers on
    assert not probe.observe(0.1, opt.param_groups[0]["lr"])
    assert probe.observe(0.1, 0.1 * _crit())  # a change made afterwards still is


def test_failing_probe_warns_and_continues_unless_raise() -> None:
    probe = _probe(ScriptedEngine(RuntimeError("out of memory")))
    with pytest.warns(CoherenceWarning, match="failed .*out of memory.*training continues"):
        res = probe.run(nn.Linear(3, 2), _opt(0.1), B)
    assert res.error and not res.metrics and probe.history[-1]["error"]
    probe = _probe(ScriptedEngine(math.nan))
    with pytest.warns(CoherenceWarning, match="non-finite"):
        probe.run(nn.Linear(3, 2), _opt(0.1), B)
    probe = _probe(ScriptedEngine(RuntimeError("boom")), on_unstable="raise")
    with pytest.warns(CoherenceWarning), pytest.raises(CoherenceProbeError, match="boom"):
        probe.run(nn.Linear(3, 2), _opt(0.1), B)


def test_schedule_counts_optimizer_steps_through_hook() -> None:
    model = nn.Linear(3, 2)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    probe = _probe(ScriptedEngine(), every_n_steps=3)
    probe.attach(sam)
    due = []
    for _ in range(7):
        model(torch.randn(4, 3)).sum().backward()
        sam.first_step(zero_grad=True)
        model(torch.randn(4, 3)).sum().backward()
        sam.second_step(zero_grad=True)
        due.append(probe.due())
        if probe.due():
            probe.run(model, sam, B)
    probe.detach()
    assert probe.steps == 7 and due == [False, False, True, False, False, True, False]


def test_state_dict_round_trip() -> None:
    probe = _probe(ScriptedEngine())
    opt = _opt(1.5 * _crit())
    with pytest.warns(CoherenceWarning):
        for _ in range(3):
            probe.count_step()
            probe.run(nn.Linear(3, 2), opt, B)
    state = probe.state_dict()
    fresh = _probe(ScriptedEngine())
    fresh.load_state_dict(state)
    assert fresh.history == probe.history and fresh.armed == probe.armed
    assert fresh.steps == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still above 1: no new warning after resume
        fresh.steps += 1
        fresh.run(nn.Linear(3, 2), opt, B)


def test_probe_batch_is_seeded_and_leaves_global_rng() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(100.0).unsqueeze(1), torch.arange(100))
    state = torch.get_rng_state()
    x1, y1 = sample_probe(data, 10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    x2, _ = sample_probe(torch.utils.data.DataLoader(data, shuffle=True).dataset, 10, seed=3)
    assert torch.equal(x1, x2) and len(set(y1.tolist())) == 10
    assert not torch.equal(x1, sample_probe(data, 10, seed=4)[0])
    assert sample_probe(data, 500, seed=0)[0].shape[0] == 100


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"max_overhead": 0.0}, "max_overhead"),
        ({"probe_size": 1}, "probe_size"),
        ({"dataset_size": -3}, "dataset_size"),
        ({"on_unstable": "explode"}, "on_unstable"),
        ({"margin_warning": 1.5}, "margin_warning"),
        ({"lr_safety": 0.0}, "lr_safety"),
        ({"sharpness": "max"}, "sharpness"),
        ({"seed": -1}, "seed"),
        ({"probe": 3}, "probe"),
        ({"probe": (torch.zeros(3, 2), torch.zeros(4))}, "probe"),
    ],
)
def test_invalid_arguments_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CoherenceProbe(**kwargs)


def test_time_budget_stretches_the_interval() -> None:
    class SlowEngine(ScriptedEngine):
        def __call__(self, *args, **kwargs):
            time.sleep(0.05)
            return super().__call__(*args, **kwargs)

    model, opt = nn.Linear(3, 2), _opt(0.01)
    fixed = _probe(SlowEngine(), every_n_steps=2)
    budget = _probe(SlowEngine(), every_n_steps=2, max_overhead=0.1)
    for probe in (fixed, budget):
        for _ in range(2):
            probe.count_step()
            time.sleep(0.002)
        assert probe.due()
        probe.run(model, opt, B)
    assert fixed.next_probe_step == 4
    # ~0.1 s of probing needs ~1 s of training at ~2 ms per step: hundreds of steps
    assert budget.next_probe_step > 100
    assert budget.state_dict()["next_probe_step"] == budget.next_probe_step


def test_non_sgd_optimizer_noted_once() -> None:
    probe = _probe(ScriptedEngine())
    adam = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    with pytest.warns(CoherenceWarning, match="derived for SGD"):
        probe.run(nn.Linear(3, 2), adam, B)
    probe.count_step()
    assert probe.run(nn.Linear(3, 2), adam, B).messages == ()


def _tiny_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (x, y)


def test_default_engine_is_measure_curvature() -> None:
    from torch_coherence.curvature import measure_curvature
    from torch_coherence.theory import stability_report

    model, (x, y) = _tiny_problem()
    probe = CoherenceProbe(
        loss=nn.CrossEntropyLoss(), probe=(x, y), dataset_size=120, lookahead=False
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    res = probe.measure(model, opt, 6)
    curv = measure_curvature(model, x, y, nn.CrossEntropyLoss(), n=120, sharpness=None, seed=0)
    # the probe's own sigma over its m = 12 examples, said so (no extrapolation to n)
    assert res.metrics["coherence/sigma"] == pytest.approx(curv.stats.sigma, rel=1e-12)
    assert res.metrics["coherence/sigma_n"] == 12
    assert res.metrics["sharpness/ggn"] == pytest.approx(curv.stats.sharpness, rel=1e-12)
    ref = stability_report(curv.stats.sharpness, max(curv.stats.sigma, 1.0), 0.2, 6, 120)
    assert res.metrics["stability/margin"] == pytest.approx(ref.margin, rel=1e-12)


def test_mean_square_rate_gets_momentum_and_sam() -> None:
    """rho(T) and the report use the optimizer's momentum and SAM's rho and alpha = ||grad||."""
    from torch_coherence.curvature import measure_curvature
    from torch_coherence.curvature.losses import per_sample_losses
    from torch_coherence.dynamics import mean_square_rate

    n, b, lr, beta, rho = 120, 6, 2.0, 0.5, 0.05  # a rate set by the top curvature
    model, (x, y) = _tiny_problem()
    loss = nn.CrossEntropyLoss()
    curv = measure_curvature(model, x, y, loss, n=n, sharpness=None, seed=0, return_gram=True)

    def rate_of(opt) -> tuple[float, object]:
        probe = CoherenceProbe(
            loss=loss, probe=(x, y), dataset_size=n, mean_square_rate=True, lookahead=False
        )
        res = probe.measure(model, opt, b)
        return res.metrics["stability/mean_square_rate"], res.report

    plain, _ = rate_of(torch.optim.SGD(model.parameters(), lr=lr))
    heavy, rep = rate_of(torch.optim.SGD(model.parameters(), lr=lr, momentum=beta))
    assert plain == pytest.approx(mean_square_rate(curv.gram, lr, b, n=n), rel=1e-9)
    assert heavy == pytest.approx(mean_square_rate(curv.gram, lr, b, n=n, momentum=beta), rel=1e-9)
    assert heavy != pytest.approx(plain, rel=1e-3) and rep.momentum == beta

    # SAM normalises its ascent by the gradient norm: alpha = |G|, estimated without the
    # tr(Sigma)/m bias of the probe's mean gradient (|G|^2 = |g_m|^2 / (1 + B_simple / m)).
    sam = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=beta)
    model.eval()
    g = torch.autograd.grad(per_sample_losses(loss, model(x), y).mean(), model.parameters())
    model.train()
    g2 = float(sum(t.double().square().sum() for t in g))
    # the probe takes |g_m|^2 from the engine (1^T P 1 / m^2, no backward pass of its own):
    # equal to this float32 backward pass up to float32 rounding
    assert curv.mean_gradient_sq_norm == pytest.approx(g2, rel=1e-6)
    g2 = curv.mean_gradient_sq_norm
    alpha = (g2 / (1 + curv.gradient_noise_scale / x.shape[0])) ** 0.5
    sam_rate, rep = rate_of(sam)
    assert rep.sam_rho == rho and rep.sam_alpha == pytest.approx(alpha, rel=1e-9)
    assert 0 < alpha < g2**0.5
    expected = mean_square_rate(curv.gram, lr, b, n=n, momentum=beta, sam_rho=rho, sam_alpha=alpha)
    assert sam_rate == pytest.approx(expected, rel=1e-9)
    assert sam_rate != pytest.approx(heavy, rel=1e-6)
    for p in model.parameters():
        assert p.grad is None  # the gradient for alpha left no trace


# ---------------------------------------------------------------- typical vs mean square


class GramEngine:
    """Returns the coherence statistics and the block Gram of fixed per-sample factors."""

    def __init__(self, factors: torch.Tensor) -> None:
        from torch_coherence import coherence_from_gram

        self.gram = torch.einsum("irp,jsp->irjs", factors, factors)
        self.stats = coherence_from_gram(self.gram)

    def __call__(self, model, inputs, targets, loss, **kwargs):
        return SimpleNamespace(
            stats=self.stats,
            ggn_sharpness=self.stats.sharpness,
            hessian_sharpness=None,
            gradient_noise_scale=1.0,
            gram=self.gram,
        )


def _section4_probe(**kw) -> CoherenceProbe:
    """docs/theory.md §4: n = 3, curvatures (1, 1/4, 1/4), B = 1: rho(T) > 1 > e^gamma at 2.25."""
    factors = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64).view(3, 1, 1)
    data = (torch.randn(3, 3), torch.randint(0, 2, (3,)))
    kw.setdefault("margin_warning", None)
    kw.setdefault("max_overhead", None)
    kw.setdefault("every_n_steps", 1)
    kw.setdefault("lookahead", False)
    return CoherenceProbe(
        loss=nn.CrossEntropyLoss(), probe=data, dataset_size=3, engine=GramEngine(factors), **kw
    )


def test_lyapunov_waits_for_the_time_budget() -> None:
    """With max_overhead the Lyapunov part (about 1 s) runs only once training time allows."""
    seen: list[str] = []
    probe = _section4_probe(max_overhead=0.01)
    probe.count_step()
    res = probe.run(nn.Linear(3, 2), _opt(2.25), 1, warn=lambda text, category: seen.append(text))
    assert "stability/lyapunov" not in res.metrics
    # waiting for the budget is silent; the warning names the criterion it used
    assert len(seen) == 1 and "criterion 'theorem1'" in seen[0]  # margin 1.06 at eta 2.25
    probe.schedule.t0 -= 1000.0  # as if 1000 s of training had passed: 1% of it is 10 s
    probe.count_step()
    res = probe.run(nn.Linear(3, 2), _opt(2.25), 1, warn=lambda text, category: seen.append(text))
    assert res.metrics["stability/lyapunov"] == pytest.approx(-0.2458, abs=1e-4)


def test_lyapunov_metrics_are_the_dynamics_values() -> None:
    """gamma and the typical critical lr are those of lyapunov_exponent on the same Gram."""
    from torch_coherence import critical_lr_typical, lyapunov_exponent

    probe = _section4_probe()
    res = probe.run(nn.Linear(3, 2), _opt(2.25), 1)
    gram = probe._engine.gram
    ref = lyapunov_exponent(gram, 2.25, 1, 3, steps=200, repeats=4, seed=0)
    assert ref.exact  # commuting (one-dimensional) curvature: E log|1 - eta h_i| exactly
    assert res.metrics["stability/lyapunov"] == pytest.approx(ref.value, rel=1e-12)
    # hand formula: (1/3) sum_i log|1 - 2.25 h_i| for B = 1 over n = 3 (Bernoulli, p = 1/3)
    # with the batch mean of Bernoulli draws; checked against the dynamics' exact value:
    assert res.metrics["stability/lyapunov"] == pytest.approx(-0.2458, abs=1e-4)
    crit = critical_lr_typical(gram, 1, 3, steps=200, repeats=4, seed=0, rel_tol=2e-2)
    assert res.metrics["stability/typical_critical_lr"] == pytest.approx(crit.lr, rel=1e-12)
    assert res.metrics["stability/typical_critical_lr"] == pytest.approx(4.6976, rel=2e-2)


def test_typical_criterion_explains_the_mean_square_only_case() -> None:
    """At eta = 2.25 Theorem 1 fires (margin > 1) while gamma < 0: the default criterion
    says "mean-square unstable ... most runs still settle" once and takes no action; the
    theorem1 criterion acts; at eta = 6 (gamma > 0) the typical criterion acts."""
    seen: list[str] = []
    probe = _section4_probe(on_unstable="stop", act_on="linear")
    model = nn.Linear(3, 2)
    res = probe.run(model, _opt(2.25), 1, warn=lambda text, category: seen.append(text))
    assert res.report.unstable and res.metrics["stability/lyapunov"] < 0
    assert not res.stop
    assert len(seen) == 1 and "mean-square unstable" in seen[0] and "not divergence" in seen[0]
    assert "although most runs still settle" in seen[0] and "gamma = -0.246" in seen[0]
    probe.count_step()
    probe.run(
        model, _opt(2.25), 1, warn=lambda text, category: seen.append(text)
    )  # hysteresis: said once
    assert len(seen) == 1
    probe.count_step()
    res = probe.run(model, _opt(6.0), 1, warn=lambda text, category: seen.append(text))
    assert res.stop and res.metrics["stability/lyapunov"] > 0
    assert len(seen) == 2 and "gamma = +" in seen[1] and "not necessarily divergence" in seen[1]
    assert "criterion 'typical'" in seen[1] and "will diverge" not in seen[1]

    strict = _section4_probe(on_unstable="stop", criterion="theorem1", act_on="linear")
    res = strict.run(model, _opt(2.25), 1, warn=lambda text, category: seen.append(text))
    assert res.stop and "criterion 'theorem1'" in seen[-1]
    assert "mean-square divergence" in seen[-1]


def test_mean_square_criterion_uses_rho() -> None:
    seen: list[str] = []
    probe = _section4_probe(on_unstable="stop", criterion="mean_square", act_on="linear")
    res = probe.run(nn.Linear(3, 2), _opt(2.25), 1, warn=lambda text, category: seen.append(text))
    assert res.metrics["stability/mean_square_rate"] == pytest.approx(1.28125, rel=1e-9)
    assert res.stop and "rho(T) = 1.281 > 1" in seen[-1]
    calm = _section4_probe(on_unstable="stop", criterion="mean_square", act_on="linear")
    res = calm.run(nn.Linear(3, 2), _opt(1.5), 1, warn=lambda text, category: seen.append(text))
    assert not res.stop and res.metrics["stability/mean_square_rate"] < 1


def test_typical_falls_back_to_theorem1_without_a_gram() -> None:
    seen: list[str] = []
    probe = _probe(ScriptedEngine(), margin_warning=None, criterion="typical")
    res = probe.run(
        nn.Linear(3, 2), _opt(2.0 * _crit()), B, warn=lambda text, category: seen.append(text)
    )
    assert "stability/lyapunov" not in res.metrics
    assert "Probes without it use Theorem 1" in seen[0] and "block Gram" in seen[0]
    assert "criterion 'theorem1'" in seen[1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"criterion": "typicall"}, "criterion"),
        ({"lyapunov": 1}, "lyapunov"),
        ({"lyapunov": False, "criterion": "typical"}, "lyapunov=True"),
    ],
)
def test_criterion_options_rejected(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        _probe(ScriptedEngine(), **kwargs)


def test_gamma_runs_within_the_leftover_budget(monkeypatch) -> None:
    """Under max_overhead the Lyapunov part runs at scheduled probes only when it fits in
    what the base probes leave of the budget; it never stretches their rhythm.

    Fake clock: 10 ms training steps, 5 ms curvature, 1 s Lyapunov part, 3% budget, 1000 s
    of training: a probe every 100 steps (0.5% of the time) and gamma in the rest.
    """
    import torch_coherence.probe.probe as P
    import torch_coherence.probe.schedule as S

    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])
    engine = GramEngine(torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64).view(3, 1, 1))

    def timed_engine(*args, **kwargs):
        clock[0] += 0.005
        return engine(*args, **kwargs)

    def dynamics(*args, **kwargs):
        clock[0] += 1.0
        return {"stability/lyapunov": -0.1, "stability/lyapunov_stderr": 0.0}

    monkeypatch.setattr(P, "linear_dynamics", dynamics)
    probe = _section4_probe(max_overhead=0.03, every_n_steps=100)
    probe._engine = timed_engine
    opt, model = _opt(1.0), nn.Linear(3, 2)
    with_gamma = probes = 0
    for _ in range(100_000):
        probe.count_step()
        clock[0] += 0.01
        if probe.due():
            res = probe.run(model, opt, 1, warn=lambda _m, _c: None)
            probes += 1
            with_gamma += "stability/lyapunov" in res.metrics
    train = clock[0] - probe.probe_seconds
    assert probes == 1000, probes
    assert 10 <= with_gamma <= 30, with_gamma  # 2.5% of 1000 s is 25 s of gamma
    assert probe.probe_seconds / train <= 0.0301


def test_no_repeated_action_when_the_criterion_flips(monkeypatch) -> None:
    """Probes alternately with gamma (typical: stable) and without (Theorem 1: unstable)
    must not re-arm each other: one Theorem 1 warning and one stop, not one per flip."""
    A = importlib.import_module("torch_coherence.probe.assess")

    turn = [0]

    def alternating(*args, **kwargs):
        turn[0] += 1
        if turn[0] % 2:
            return {}
        return {"stability/lyapunov": -0.2, "stability/lyapunov_stderr": 0.0}

    monkeypatch.setattr(A, "_lyapunov_metrics", alternating)
    seen: list[str] = []
    probe = _section4_probe(on_unstable="stop", act_on="linear")
    stops = 0
    for _ in range(6):
        probe.count_step()
        res = probe.run(
            nn.Linear(3, 2), _opt(2.25), 1, warn=lambda text, category: seen.append(text)
        )
        stops += res.stop
    theorem1 = [m for m in seen if "criterion 'theorem1'" in m]
    assert len(theorem1) == 1, seen
    assert stops == 3  # the action follows the verdict of each probe; the warning is once


def test_adjust_lr_never_raises_the_learning_rate() -> None:
    probe = _section4_probe(on_unstable="adjust_lr", lr_safety=0.5, act_on="linear")
    res = probe.run(nn.Linear(3, 2), _opt(6.0), 1, warn=lambda _m, _c: None)
    assert res.new_lr is not None and res.new_lr <= 0.5 * 6.0
    assert res.new_lr == pytest.approx(0.5 * res.metrics["stability/typical_critical_lr"])


def test_one_tag_list_with_descriptions() -> None:
    from torch_coherence.probe import CONDITIONAL_TAGS, TAG_DESCRIPTIONS

    assert list(TAG_DESCRIPTIONS) == list(TAGS) and len(set(TAGS)) == len(TAGS)
    assert set(CONDITIONAL_TAGS) <= set(TAGS)
    contract = {
        "coherence/sigma",
        "coherence/sigma_n",
        "coherence/sigma_stderr",
        "coherence/sigma_probe",
        "probe/size",
        "sharpness/samples",
        "stability/blowup_lr",
        "stability/critical_lr",
        "stability/typical_critical_lr",
        "stability/lyapunov",
        "stability/mean_square_rate",
    }
    assert contract <= set(TAGS)


def test_result_survives_pickling_for_the_ddp_broadcast() -> None:
    import pickle

    from probe.fakes import ScriptedLookahead, collect

    probe = _probe(ScriptedEngine(), lookahead=True, lookahead_module=ScriptedLookahead(0.1))
    res = probe.run(nn.Linear(3, 2), _opt(0.2), B, warn=collect([]))
    back = pickle.loads(pickle.dumps(res))
    assert back == res and back.categories == res.categories and back.lookahead.predicted
    other = _probe(ScriptedEngine())
    other.commit(back, warn=collect([]))
    assert other.armed == probe.armed and other.history == probe.history


def test_lookahead_takes_a_per_sample_loss_as_the_mean_of_its_values() -> None:
    """A per-sample callable loss (the engine's convention, e.g. a causal LM's loss of one
    sequence) is averaged over the lookahead's batches: the same short runs as with the
    equivalent loss module. Called on a whole batch, this one would raise."""

    def per_sample(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.unsqueeze(0), target.unsqueeze(0))

    model, (x, y) = _tiny_problem()
    runs = []
    for loss in (nn.CrossEntropyLoss(), per_sample):
        probe = CoherenceProbe(
            loss=loss,
            probe=(x, y),
            dataset_size=12,
            max_overhead=None,
            lyapunov=False,
            criterion="theorem1",
        )
        res = probe.measure(model, torch.optim.SGD(model.parameters(), lr=3.0), 4)
        assert res.error is None and res.lookahead is not None, res.messages
        runs.append(res.lookahead)
    module, callable_ = runs
    assert callable_.loss_start == pytest.approx(module.loss_start, rel=1e-6)
    assert list(callable_.blew_up) == list(module.blew_up)
    assert list(callable_.loss_end) == pytest.approx(list(module.loss_end), rel=1e-5)
