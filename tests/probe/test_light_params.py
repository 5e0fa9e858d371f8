"""Light probes and warm starts when the parameters change, and the global RNG around the
light probe's batch draw: a vector is only ever used with the parameters it came from."""

from __future__ import annotations

import pytest
import torch
from probe.fakes import collect
from torch import nn

import torch_coherence.probe.schedule as S
from torch_coherence.curvature import dataset_sharpness, tracked_sharpness
from torch_coherence.probe import CoherenceProbe


def _data(n: int = 40) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


class Augmented(torch.utils.data.Dataset):
    """A map-style dataset whose items draw from the global RNG (a random augmentation)."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.randn(x.shape), y


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
        nn.Linear(4, 3),
    )  # fmt: skip


def _probe(monkeypatch, data, **kw) -> tuple[CoherenceProbe, list[float]]:
    """Full probes cost 100 s on a fake clock: the scheduled ones become light probes."""
    from torch_coherence.curvature import measure_curvature

    clock = [0.0]
    monkeypatch.setattr(S, "now", lambda: clock[0])

    def engine(*args, **kwargs):
        clock[0] += 100.0
        return measure_curvature(*args, **kwargs)

    kw.setdefault("engine", engine)
    probe = CoherenceProbe(
        loss=nn.CrossEntropyLoss(),
        probe=data,
        probe_size=len(data),
        dataset_size=len(data),
        every_n_steps=5,
        max_overhead=0.5,
        criterion="theorem1",
        lookahead=False,
        **kw,
    )
    return probe, clock


def _steps(probe: CoherenceProbe, clock: list[float], k: int = 5) -> None:
    for _ in range(k):
        clock[0] += 1.0
        probe.count_step()


def test_the_light_probe_leaves_the_global_rng_of_an_augmenting_dataset(monkeypatch) -> None:
    data = Augmented(_data())
    probe, clock = _probe(monkeypatch, data)
    model, opt = _model(), None
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe.start()
    probe.run(model, opt, 8, warn=collect([]))
    _steps(probe, clock)
    rng = torch.get_rng_state()
    res = probe.run(model, opt, 8, warn=collect([]))
    assert res.kind == "light" and res.error is None, res.error
    assert torch.equal(rng, torch.get_rng_state())


def test_engine_params_by_name_light_probe_over_those_params(monkeypatch) -> None:
    """engine_kwargs params given as names (the engine accepts them): the light probe runs
    and tracks the data-set eigenvector of those parameters."""
    data = _data()
    names = ["6.weight", "6.bias"]
    probe, clock = _probe(monkeypatch, data, engine_kwargs={"params": names})
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe.start()
    first = probe.run(model, opt, 8, warn=collect([]))
    assert first.error is None, first.error
    _steps(probe, clock)
    res = probe.run(model, opt, 8, warn=collect([]))
    assert res.kind == "light" and res.error is None, res.error
    sub = [dict(model.named_parameters())[k] for k in names]
    full = dataset_sharpness(model, nn.CrossEntropyLoss(), data, kind="ggn", params=sub, seed=0)
    assert first.metrics["sharpness/ggn"] == pytest.approx(full.value, rel=1e-6)
    direct = tracked_sharpness(model, nn.CrossEntropyLoss(), *data.tensors, full.vector, params=sub)
    assert res.metrics["sharpness/tracked"] == pytest.approx(direct.value, rel=1e-4)


def _train(layer: nn.Module, flag: bool) -> None:
    for p in layer.parameters():
        p.requires_grad_(flag)


def test_a_vector_of_other_parameters_of_the_same_size_is_not_tracked(monkeypatch) -> None:
    data = _data()
    probe, clock = _probe(monkeypatch, data)
    model = _model()
    _train(model[4], False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe.start()
    probe.run(model, opt, 8, warn=collect([]))
    _train(model[2], False)  # as many trainable entries as before, other ones
    _train(model[4], True)
    _steps(probe, clock)
    res = probe.run(model, opt, 8, warn=collect([]))
    assert res.kind == "postponed"  # skipped: nothing computed with the wrong vector


@pytest.mark.parametrize(
    "kw", [{"estimates": "dataset"}, {"estimates": "probe", "sharpness": "hessian"}]
)
def test_warm_starts_survive_a_change_of_the_trainable_parameters(monkeypatch, kw) -> None:
    """Unfreezing a layer between full probes: the next full probe starts cold instead of
    failing on a warm start of the old size (at every probe from then on)."""
    data = _data()
    probe, _ = _probe(monkeypatch, data, **kw)
    probe.schedule.max_overhead = None  # every probe in full
    model = _model()
    _train(model[0], False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe.start()
    probe.run(model, opt, 8, warn=collect([]))
    _train(model[0], True)
    probe.count_step()
    seen: list = []
    for _ in range(2):
        _steps(probe, [0.0])
        res = probe.run(model, opt, 8, warn=collect(seen))
        assert res.error is None, res.error
    assert not seen, seen
