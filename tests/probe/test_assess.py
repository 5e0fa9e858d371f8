"""The pure assessment and its functional twin, against hand computations."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from probe.fakes import SHARP, SIGMA, B, N, ScriptedEngine, collect, scripted_probe
from torch import nn

from torch_coherence.optim import SAM
from torch_coherence.probe import Estimate, assess, effective_optimizer_params
from torch_coherence.theory import critical_lr, stability_report

A = importlib.import_module("torch_coherence.probe.assess")


def _curv(m: int = 8, **kw) -> SimpleNamespace:
    engine = ScriptedEngine(**kw)
    return engine(None, torch.zeros(m, 3), None, None)


def test_functional_twin_matches_the_probe() -> None:
    opt = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.05, momentum=0.5)
    probe = scripted_probe(lookahead=False, lookahead_module=None)
    res = probe.run(nn.Linear(3, 2), opt, B, warn=collect([]))
    out = assess(_curv(), opt, B, N)
    res.metrics.pop("probe/seconds")
    assert out.metrics == res.metrics
    ref = stability_report(SHARP, SIGMA, 0.05, B, N, momentum=0.5)
    assert out.report == ref == res.report


def test_estimates_say_what_they_refer_to() -> None:
    settings = {"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-3, "sam_rho": None}
    out = assess(
        _curv(),
        settings,
        B,
        N,
        sharpness=Estimate(1.5, 1000, 0.02),
        sigma=Estimate(7.0, 1000, 0.5),
    )
    m = out.metrics
    assert (m["coherence/sigma"], m["coherence/sigma_n"], m["coherence/sigma_stderr"]) == (
        7.0,
        1000.0,
        0.5,
    )
    assert m["coherence/sigma_probe"] == SIGMA and m["probe/size"] == 8
    assert m["sharpness/ggn"] == 1.5 and m["sharpness/samples"] == 1000
    # weight decay adds wd to the sharpness the thresholds use
    assert out.report == stability_report(1.5 + 1e-3, 7.0, 0.05, B, N)
    # no standard error: no tag (never a made-up number)
    assert "coherence/sigma_stderr" not in assess(_curv(), settings, B, N).metrics


def test_learning_rate_zero_has_no_report_and_no_division() -> None:
    settings = {"lr": 0.0, "momentum": 0.9, "weight_decay": 0.0, "sam_rho": None}
    out = assess(_curv(), settings, B, N)
    assert out.report is None
    assert out.metrics["stability/critical_lr"] == pytest.approx(
        critical_lr(SHARP, SIGMA, B, N, momentum=0.9)
    )
    assert "stability/margin" not in out.metrics


def test_batch_size_is_clamped_to_one_and_n() -> None:
    settings = {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "sam_rho": None}
    assert assess(_curv(), settings, 0.2, N).report.batch_size == 1
    assert assess(_curv(), settings, 5 * N, N).report.batch_size == N


def test_non_finite_estimates_are_refused() -> None:
    settings = {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "sam_rho": None}
    with pytest.raises(FloatingPointError, match="sigma"):
        assess(_curv(sigma=math.nan), settings, B, N)


def test_sam_alpha_from_the_engines_gradient_without_a_backward_pass() -> None:
    """With the engine's |g_m|^2 = 1^T P 1 / m^2 the probe runs no backward pass of its own;
    alpha = |g_m| / sqrt(1 + B_simple / m)."""

    class Engine(ScriptedEngine):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            out.mean_gradient_sq_norm = 4.0
            return out

    class NoForward(nn.Linear):
        def forward(self, x):
            raise AssertionError("the probe ran a forward pass of its own")

    model = NoForward(3, 2)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01)
    probe = scripted_probe(Engine(), lookahead=False, lookahead_module=None)
    res = probe.run(model, sam, B, warn=collect([]))
    assert res.error is None
    assert res.report.sam_alpha == pytest.approx(math.sqrt(4.0 / (1.0 + 12.0 / 8)))
    assert A.sam_alpha(4.0, math.inf, 8) == pytest.approx(2.0)  # noise-dominated: |g_m|
    assert effective_optimizer_params(sam)["sam_rho"] == 0.05


def _dataset_case(n: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return torch.utils.data.TensorDataset(x, y), model, nn.CrossEntropyLoss()


@pytest.mark.parametrize("estimates", ["dataset", "auto", None])
def test_dataset_estimates_are_those_of_the_estimators(estimates) -> None:
    """estimates='dataset', and by default ('auto') when the training dataset is known: the
    thresholds use dataset_sharpness and exact_sigma (n <= 500) over the training set, and
    the tags say over how many examples."""
    from torch_coherence.curvature import dataset_sharpness, exact_sigma
    from torch_coherence.probe import CoherenceProbe

    data, model, loss = _dataset_case(40)
    kw = {} if estimates is None else {"estimates": estimates}
    probe = CoherenceProbe(
        loss=loss,
        probe=data,
        probe_size=16,
        dataset_size=40,
        lookahead=False,
        criterion="theorem1",
        max_overhead=None,
        **kw,
    )
    assert probe.uses_dataset_estimates
    res = probe.run(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, warn=collect([]))
    sharp = dataset_sharpness(model, loss, data, kind="ggn", seed=0)
    sig = exact_sigma(model, loss, data)
    m = res.metrics
    assert m["sharpness/ggn"] == pytest.approx(sharp.value, rel=1e-6)
    assert m["sharpness/samples"] == sharp.n_samples == 40
    assert m["coherence/sigma"] == pytest.approx(sig.value, rel=1e-9)
    assert m["coherence/sigma_n"] == sig.n == 40
    assert m["coherence/sigma_stderr"] == 0.0  # exact
    assert m["probe/size"] == 16 and m["coherence/sigma_probe"] != m["coherence/sigma"]
    # the next probe's Lanczos starts from this one's vector, which the light probes track
    assert probe._tracked is not None and probe._tracked.kind == "ggn"
    assert probe._tracked.sharpness == pytest.approx(sharp.value, rel=1e-6)


def test_large_datasets_get_the_pps_sigma_estimate() -> None:
    from torch_coherence.curvature import estimate_sigma
    from torch_coherence.probe import CoherenceProbe

    data, model, loss = _dataset_case(520)
    probe = CoherenceProbe(
        loss=loss, probe=data, dataset_size=520, lookahead=False, criterion="theorem1"
    )
    res = probe.run(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, warn=collect([]))
    sig = estimate_sigma(model, loss, data, m=256, seed=0)
    assert res.metrics["coherence/sigma"] == pytest.approx(sig.value, rel=1e-9)
    assert res.metrics["coherence/sigma_stderr"] == pytest.approx(sig.stderr)
    assert sig.stderr > 0 and sig.method == "pps"
    assert res.metrics["coherence/sigma_n"] == 520 == res.metrics["sharpness/samples"]


def test_explicit_tensors_or_estimates_probe_keep_the_probes_own_values() -> None:
    from torch_coherence.probe import CoherenceProbe

    data, model, loss = _dataset_case(40)
    common = {"loss": loss, "probe_size": 16, "dataset_size": 40, "lookahead": False}
    common["criterion"] = "theorem1"
    for probe in (
        CoherenceProbe(probe=data.tensors, **common),  # explicit tensors: no dataset known
        CoherenceProbe(probe=data, estimates="probe", **common),
    ):
        assert not probe.uses_dataset_estimates
        res = probe.run(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, warn=collect([]))
        m = res.metrics
        assert m["coherence/sigma"] == m["coherence/sigma_probe"]
        assert m["coherence/sigma_n"] == m["probe/size"] == m["sharpness/samples"]
    with pytest.raises(ValueError, match="estimates"):
        CoherenceProbe(estimates="full")


def test_auto_falls_back_to_the_probes_values_when_the_dataset_estimates_fail() -> None:
    """A class-weighted loss (which dataset_sharpness refuses): with the default 'auto' the
    probe's own values stand and a note says so once; 'dataset' reports the failure."""
    from torch_coherence.probe import CoherenceProbe, CoherenceWarning

    data, model, _ = _dataset_case(40)
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0]))
    common = {"loss": loss, "probe": data, "probe_size": 16, "dataset_size": 40}
    common.update(lookahead=False, criterion="theorem1", max_overhead=None)
    probe = CoherenceProbe(**common)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list = []
    for _ in range(2):
        res = probe.run(model, opt, 8, warn=collect(seen))
        assert res.error is None and res.metrics["coherence/sigma_n"] == 16
    notes = [t for t, c in seen if "could not be computed" in t]
    assert len(notes) == 1 and "class weights" in notes[0]
    assert all(c is CoherenceWarning for t, c in seen if t in notes)
    strict = CoherenceProbe(estimates="dataset", **common)
    res = strict.run(model, opt, 8, warn=collect([]))
    assert res.error is not None and "class weights" in res.error
