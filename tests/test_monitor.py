"""CoherenceMonitor in a plain PyTorch loop with a SummaryWriter."""

from __future__ import annotations

import glob
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from torch_coherence import CoherenceMonitor
from torch_coherence.optim import SAM
from torch_coherence.probe import BlowupWarning


def _data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(model, opt, monitor, steps: int, sam: bool = False) -> None:
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(_data(), batch_size=8, shuffle=True)
    done = 0
    while done < steps:
        for x, y in loader:
            if sam:
                loss_fn(model(x), y).backward()
                opt.first_step(zero_grad=True)
                loss_fn(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            if monitor is not None:
                monitor.step(opt, batch_size=x.shape[0])
                if monitor.should_stop:
                    return
            done += 1
            if done == steps:
                return


def test_plain_loop_logs_to_summary_writer(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    writer = SummaryWriter(str(tmp_path))
    monitor = CoherenceMonitor(
        model,
        nn.CrossEntropyLoss(),
        _data(),
        writer=writer,
        max_overhead=None,
        every_n_steps=3,
        probe_size=16,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, opt, monitor, steps=9)
    monitor.log_figure()
    writer.close()
    assert [h["step"] for h in monitor.history] == [3, 6, 9]
    assert monitor.probe.dataset_size == 64
    acc = EventAccumulator(glob.glob(str(tmp_path / "events.*"))[0])
    acc.Reload()
    assert {"coherence/sigma", "stability/margin", "stability/critical_lr"} <= set(
        acc.Tags()["scalars"]
    )
    assert "coherence/phase_plane" in acc.Tags()["images"]


def test_monitor_with_sam_reads_rho_and_weights_unchanged() -> None:
    m1, m2 = _model(), _model()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    monitor = CoherenceMonitor(
        m2, nn.CrossEntropyLoss(), _data(), max_overhead=None, every_n_steps=2, probe_size=16
    )
    torch.manual_seed(1)
    _train(m1, o1, None, steps=4, sam=True)
    torch.manual_seed(1)
    _train(m2, o2, monitor, steps=4, sam=True)
    assert monitor.probe.last_report.sam_rho == 0.05
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_stop_and_state_dict() -> None:
    model = _model()
    monitor = CoherenceMonitor(
        model,
        nn.CrossEntropyLoss(),
        _data(),
        max_overhead=None,
        every_n_steps=1,
        probe_size=16,
        on_unstable="stop",
    )
    opt = torch.optim.SGD(model.parameters(), lr=500.0)
    # on_unstable acts on the lookahead's blow-up prediction (act_on="blowup", the default)
    with pytest.warns(BlowupWarning, match="predicted to blow up at learning rate 500"):
        _train(model, opt, monitor, steps=5)
    assert monitor.should_stop and len(monitor.history) == 1
    state = monitor.state_dict()
    again = CoherenceMonitor(_model(), nn.CrossEntropyLoss(), _data(), every_n_steps=1)
    again.load_state_dict(state)
    assert again.history == monitor.history and again.should_stop


def test_explicit_tensors_need_dataset_size() -> None:
    x, y = _data().tensors
    with pytest.raises(ValueError, match="dataset_size"):
        CoherenceMonitor(_model(), nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="model"):
        CoherenceMonitor("net", nn.CrossEntropyLoss(), (x, y), 64)
    with pytest.raises(ValueError, match="every_n_steps"):
        CoherenceMonitor(_model(), nn.CrossEntropyLoss(), (x, y), 64, every_n_steps=-1)
    monitor = CoherenceMonitor(_model(), nn.CrossEntropyLoss(), (x[:10], y[:10]), 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.step(torch.optim.SGD(_model().parameters(), lr=0.01), 8) is None


def test_shared_options_have_the_probes_names_and_defaults() -> None:
    """CoherenceMonitor and CoherenceCallback take the probe's options as it documents them."""
    import inspect

    from torch_coherence.callbacks import CoherenceCallback
    from torch_coherence.probe import EXTRA_OPTIONS, SHARED_OPTIONS, CoherenceProbe

    probe = inspect.signature(CoherenceProbe).parameters
    for cls in (CoherenceMonitor, CoherenceCallback):
        params = inspect.signature(cls).parameters
        for name in (*SHARED_OPTIONS, *EXTRA_OPTIONS):
            assert params[name].default == probe[name].default, (cls.__name__, name)
            assert params[name].annotation == probe[name].annotation, (cls.__name__, name)
        for name in ("loss", "probe", "dataset_size"):
            assert name in params
        for name in (*SHARED_OPTIONS, *EXTRA_OPTIONS):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (cls.__name__, name)
    # the callback's options in the monitor's order
    order = list(inspect.signature(CoherenceMonitor).parameters)
    ours = [n for n in inspect.signature(CoherenceCallback).parameters if n in order]
    assert ours == [n for n in order if n in ours]
    cb = CoherenceCallback(every_n_steps=7, max_overhead=None, seed=3, sharpness="ggn")
    assert (cb.probe.every_n_steps, cb.probe.max_overhead, cb.probe.seed) == (7, None, 3)
    assert cb.probe.sharpness == "ggn"
    extra = {"act_on": "linear", "max_triggered": 2, "lookahead": False, "estimates": "dataset"}
    monitor = CoherenceMonitor(_model(), nn.CrossEntropyLoss(), _data(), **extra)
    for made in (CoherenceCallback(**extra), monitor):
        assert (made.probe.act_on, made.probe.max_triggered) == ("linear", 2)
        assert (made.probe.lookahead, made.probe.estimates) == (False, "dataset")


def test_start_is_the_pre_flight_probe_and_the_loss_guard_triggers() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = CoherenceMonitor(
        model, nn.functional.cross_entropy, _data(), max_overhead=None, every_n_steps=100
    )
    assert isinstance(monitor.probe.loss, nn.CrossEntropyLoss)  # the function's module
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    result = monitor.start(opt, batch_size=8)
    assert result.step == 0 and [h["step"] for h in monitor.history] == [0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert monitor.step(opt, 8, loss=torch.tensor(0.7)) is None  # finite: nothing due
    triggered = monitor.step(opt, 8, loss=torch.tensor(float("nan")))
    assert triggered is not None and triggered.step == 2


def test_unsupported_loss_names_the_accepted_kinds() -> None:
    with pytest.raises(ValueError, match=r"loss: .*Accepted: .*F\.mse_loss"):
        CoherenceMonitor(_model(), nn.SmoothL1Loss(), _data())
