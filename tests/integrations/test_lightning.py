"""CoherenceCallback in real Trainer.fit runs on CPU."""

from __future__ import annotations

import glob
import math
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from integrations.helpers import N_TRAIN, TinyClassifier, trainer_kwargs
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from torch_coherence.callbacks import CoherenceCallback
from torch_coherence.integrations.tensorboard import describe
from torch_coherence.probe import (
    TAGS,
    BlowupWarning,
    CoherenceProbe,
    CoherenceWarning,
    LinearInstabilityWarning,
)

pytestmark = pytest.mark.usefixtures("quiet_lightning")

LOGGED = [t for t in TAGS if t not in ("sharpness/hessian", "stability/mean_square_rate")]


def _fit(tmp_path, model, callbacks, **kw):
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kw))
    trainer.fit(model)
    return trainer


def test_fit_logs_tags_to_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    _fit(tmp_path, TinyClassifier(), [cb], logger=logger, max_epochs=2, max_steps=-1)
    # the pre-flight probe at step 0, before the first optimizer step, then every 2 steps
    assert [h["step"] for h in cb.history] == [0, 2, 4, 6, 8, 10, 12]
    assert cb.history[0]["batch_size"] == 16.0
    # the default estimates: the training set's (n = 96 <= 500: exact sigma_n), not the probe's
    for h in cb.history:
        assert h["sharpness/samples"] == h["coherence/sigma_n"] == N_TRAIN, h
        assert h["coherence/sigma_stderr"] == 0.0 and h["probe/size"] == 16
    (event_file,) = glob.glob(str(tmp_path / "tb" / "version_0" / "events.*"))
    acc = EventAccumulator(event_file, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    finite = {t for h in cb.history for t in LOGGED if t in h and math.isfinite(h[t])}
    assert finite and finite <= scalars
    assert {"readable/gd_ratio", "readable/log10_margin", "log10/sharpness/ggn"} <= scalars
    for tag in scalars:  # every scalar carries its description in the summary metadata
        assert acc.SummaryMetadata(tag).summary_description == describe(tag) != tag, tag
    steps = [e.step for e in acc.Scalars("coherence/sigma")]
    assert steps == [0, 2, 4, 6, 8, 10, 12]
    assert "coherence/phase_plane" in acc.Tags()["images"]
    assert len(acc.Images("coherence/phase_plane")) == 2  # one per epoch
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


@pytest.mark.parametrize(
    ("max_overhead", "probes", "figures"), [(None, [0, 9], [6, 12, 18]), (1e-4, [0], [])]
)
def test_phase_plane_only_after_new_probes_and_within_budget(
    tmp_path, max_overhead, probes, figures
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = CoherenceCallback(max_overhead=max_overhead, every_n_steps=9, probe_size=16)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    _fit(tmp_path, TinyClassifier(), [cb], logger=logger, max_epochs=4, max_steps=-1)
    # pre-flight, then the schedule; a budget of 0.01 % postpones every scheduled probe (one
    # costs far more than 0.01 % of 24 tiny training steps), the pre-flight one is outside it
    assert [h["step"] for h in cb.history][:2] == probes
    (event_file,) = glob.glob(str(tmp_path / "tb" / "version_0" / "events.*"))
    acc = EventAccumulator(event_file, size_guidance={"images": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    # 6 steps an epoch: probes at steps 0, 9 and 18 (epochs 1, 2 and 3), none in epoch 4;
    # with a budget of 0.01 % no figure (about 0.1 s) fits, not even after the pre-flight probe
    steps = [e.step for e in acc.Images("coherence/phase_plane")] if images else []
    assert steps == figures


@pytest.mark.parametrize(
    ("criterion", "phrases"),
    [
        ("theorem1", ["Theorem 1's margin", "mean-square divergence of the linearized"]),
        ("typical", ["top Lyapunov exponent gamma = +", "below the typical critical"]),
    ],
)
def test_warns_above_critical_lr_not_at_half(tmp_path, criterion, phrases) -> None:
    torch.manual_seed(0)
    model = TinyClassifier(norm=False)
    ref = CoherenceProbe(loss=model.loss_fn, probe=model.data, probe_size=16, dataset_size=N_TRAIN)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    critical = ref.measure(model, opt, 16).report.critical_lr
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fit_at(lr: float) -> list[str]:
        m = TinyClassifier(lr=lr, norm=False)
        m.load_state_dict(state)
        cb = CoherenceCallback(
            max_overhead=None,
            every_n_steps=1,
            probe_size=16,
            margin_warning=None,
            criterion=criterion,
            lookahead=False,  # the linear verdict alone (the blow-up lookahead is tested apart)
        )
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            _fit(tmp_path, m, [cb], max_steps=1)
        return [
            (w.category, str(w.message)) for w in rec if issubclass(w.category, CoherenceWarning)
        ]

    assert fit_at(0.5 * critical) == []
    above = fit_at(2.0 * critical)
    assert len(above) == 1, above
    # the linear verdict: its own category, and no claim that training diverges
    category, message = above[0]
    assert category is LinearInstabilityWarning
    assert f"criterion {criterion!r}" in message
    assert "the linearized dynamics at these weights are unstable" in message
    assert "not necessarily divergence" in message and "will diverge" not in message
    for phrase in phrases:
        assert phrase in message


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_bit_identical_with_and_without_callback(tmp_path, accumulate) -> None:
    kw = dict(max_steps=4, accumulate_grad_batches=accumulate)
    torch.manual_seed(0)
    plain = TinyClassifier()
    init = _weights(plain)
    _fit(tmp_path, plain, [], **kw)
    probed = TinyClassifier()
    probed.load_state_dict(init)
    cb = CoherenceCallback(max_overhead=None, every_n_steps=1, probe_size=16, sharpness="both")
    _fit(tmp_path, probed, [cb], **kw)
    assert len(cb.history) == 5 and "error" not in cb.history[0]
    assert cb.history[0]["batch_size"] == 16.0 * accumulate
    a, b = _weights(plain), _weights(probed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_failing_probe_warns_and_training_continues(tmp_path) -> None:
    cb = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)

    def broken(*args, **kwargs):
        raise RuntimeError("CPU out of memory (simulated)")

    cb.probe._engine = broken
    with pytest.warns(CoherenceWarning, match="failed.*out of memory.*training continues"):
        trainer = _fit(tmp_path, TinyClassifier(), [cb], max_steps=4)
    assert trainer.global_step == 4 and len(cb.history) == 3  # steps 0, 2, 4


def test_stop_sets_should_stop(tmp_path) -> None:
    cb = CoherenceCallback(max_overhead=None, every_n_steps=1, probe_size=16, on_unstable="stop")
    # on_unstable acts on the lookahead's blow-up prediction (act_on="blowup", the default)
    with pytest.warns(BlowupWarning, match="predicted to blow up at learning rate 50"):
        trainer = _fit(tmp_path, TinyClassifier(lr=50.0, norm=False), [cb], max_steps=6)
    assert trainer.global_step < 6


def test_resume_continues_history(tmp_path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    cb = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)
    kw = dict(enable_checkpointing=True, max_epochs=1, max_steps=-1)
    _fit(tmp_path, TinyClassifier(), [cb, ckpt], **kw)
    assert [h["step"] for h in cb.history] == [0, 2, 4, 6]
    cb2 = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, callbacks=[cb2, ckpt], enable_checkpointing=True, max_epochs=2, max_steps=-1
        )
    )
    trainer.fit(TinyClassifier(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # the pre-flight probe runs again at the resume (step 6, after the state is loaded)
    assert [h["step"] for h in cb2.history] == [0, 2, 4, 6, 6, 8, 10, 12]
    assert cb2.history[:4] == cb.history


def test_csv_logger_gets_metrics_at_optimizer_steps(tmp_path) -> None:
    import csv

    cb = CoherenceCallback(max_overhead=None, every_n_steps=3, probe_size=16)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    _fit(tmp_path, TinyClassifier(), [cb], logger=logger, max_steps=6)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    probed = [r for r in rows if r.get("coherence/sigma")]
    assert [int(r["step"]) for r in probed] == [0, 3, 6]


def test_loss_required_when_module_has_none(tmp_path) -> None:
    model = TinyClassifier()
    del model.loss_fn
    model.criterion = None

    class NoLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

    m = NoLoss()
    del m.loss_fn
    call = re.escape("CoherenceCallback(loss=torch.nn.CrossEntropyLoss())")
    with pytest.raises(ValueError, match=rf"loss_fn.*{call}.*nn\.MSELoss.*F\.cross_entropy"):
        _fit(tmp_path, m, [CoherenceCallback(max_overhead=None, every_n_steps=1)], max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"probe_size": 0}, "probe_size"),
        ({"on_unstable": "panic"}, "on_unstable"),
        ({"margin_warning": 0}, "margin_warning"),
        ({"batch_size": 0}, "batch_size"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"log_figures": "yes"}, "log_figures"),
    ],
)
def test_invalid_arguments(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        CoherenceCallback(max_overhead=None, **kwargs)


def test_works_with_lightning_pytorch_trainer(tmp_path) -> None:
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TinyClassifier()
            self.loss_fn = self.inner.loss_fn

        def forward(self, x):
            return self.inner(x)

        def training_step(self, batch, batch_idx):
            return self.inner.training_step(batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            return self.inner.train_dataloader()

    cb = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)
    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=logger, max_steps=4))
    trainer.fit(Module())
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    assert len(cb._tensorboard_logs(trainer)) == 1  # lightning.pytorch's logger is found


def test_sam_automatic_equals_manual_optimization(tmp_path) -> None:
    from torch_coherence.optim import SAM

    class AutoSAM(TinyClassifier):
        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=self.lr)

    class ManualSAM(AutoSAM):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()

            def closure():
                opt.zero_grad()
                loss = self.loss_fn(self(x), y)
                self.manual_backward(loss)
                return loss

            opt.step(closure=closure)  # through Lightning, so global_step counts

    torch.manual_seed(0)
    auto = AutoSAM(norm=False)
    manual = ManualSAM(norm=False)
    manual.load_state_dict(auto.state_dict())
    cbs = [CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16) for _ in "ab"]
    _fit(tmp_path, auto, [cbs[0]], max_steps=4, max_epochs=1)
    _fit(tmp_path, manual, [cbs[1]], max_steps=4, max_epochs=1)
    for a, b in zip(_weights(auto).values(), _weights(manual).values(), strict=True):
        torch.testing.assert_close(a, b)
    for cb in cbs:
        assert [h["step"] for h in cb.history] == [0, 2, 4]
        assert cb.probe.last_report.sam_rho == 0.05


def test_two_callbacks_keep_their_own_state_in_a_checkpoint(tmp_path) -> None:
    """state_key comes from the options; sanity-check steps are not counted or probed."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    class WithVal(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self(x), y)

        def val_dataloader(self):
            return DataLoader(self.data, batch_size=16)

    def callbacks():
        return [
            CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16),
            CoherenceCallback(max_overhead=None, every_n_steps=3, probe_size=8),
        ]

    a, b = callbacks()
    assert a.state_key != b.state_key
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    kw = dict(enable_checkpointing=True, max_steps=6, num_sanity_val_steps=2)
    _fit(tmp_path, WithVal(), [a, b, ckpt], **kw)
    assert [h["step"] for h in a.history] == [0, 2, 4, 6]
    assert [h["step"] for h in b.history] == [0, 3, 6]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["history"] == a.history
    assert saved[b.state_key]["history"] == b.history
    a2, b2 = callbacks()
    pl.seed_everything(0)
    kw.update(max_steps=7, callbacks=[a2, b2, ckpt])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **kw))
    trainer.fit(WithVal(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert a2.history[:4] == a.history and b2.history[:3] == b.history


def test_largest_lr_over_every_optimizer_and_functional_loss(tmp_path) -> None:
    """Two optimizers (body lr 0.05, head lr 0.2): the head's lr is the one judged."""

    class TwoOptimizers(TinyClassifier):
        def __init__(self) -> None:
            super().__init__(norm=False)
            del self.loss_fn
            self.loss_fn = torch.nn.functional.cross_entropy  # a function, not a module
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            body, head = self.optimizers()
            x, y = batch
            body.zero_grad()
            head.zero_grad()
            loss = self.loss_fn(self(x), y)
            self.manual_backward(loss)
            body.step()
            head.step()
            return loss

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.05),
                torch.optim.SGD(self.net[-1].parameters(), lr=0.2, momentum=0.5),
            ]

    cb = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)
    _fit(tmp_path, TwoOptimizers(), [cb], max_steps=4)
    assert isinstance(cb.probe.loss, torch.nn.CrossEntropyLoss)
    assert [h["step"] for h in cb.history] == [0, 2]  # max_steps counts both optimizers' steps
    assert cb.history[0]["lr"] == 0.2
    assert cb.probe.last_report.momentum == 0.5


def test_non_finite_loss_triggers_a_probe_at_once(tmp_path) -> None:
    """The per-step guard reads the loss training_step returned (no extra forward pass)."""

    class Diverging(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.inf if self.global_step == 2 else loss

    cb = CoherenceCallback(max_overhead=None, every_n_steps=100, probe_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path, Diverging(norm=False), [cb], max_steps=5)
    # a probe right after the third step's inf loss (and, as the weights are then NaN, after
    # each later step: the guard's triggers are the probe's to bound)
    assert [h["step"] for h in cb.history][:2] == [0, 3]


def test_options_are_keyword_only_in_the_monitors_order() -> None:
    import inspect

    from torch_coherence import CoherenceMonitor

    params = inspect.signature(CoherenceCallback).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    monitor = list(inspect.signature(CoherenceMonitor).parameters)
    assert [n for n in params if n in monitor] == [n for n in monitor if n in params]
    with pytest.raises(TypeError):
        CoherenceCallback(100)
