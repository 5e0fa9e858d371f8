"""CoherenceTrainerCallback in real transformers.Trainer runs on CPU (tiny GPT-2 and BERT)."""

from __future__ import annotations

import glob
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from integrations.hf_helpers import TokenDataset, tiny_bert, tiny_gpt2, training_args
from transformers import Trainer

from torch_coherence.callbacks import CoherenceTrainerCallback
from torch_coherence.integrations.tensorboard import describe, is_coherence_tag
from torch_coherence.integrations.transformers import causal_lm_loss, infer_loss
from torch_coherence.probe import BlowupWarning, CoherenceWarning


def _train(tmp_path, model, kind, callbacks, **kw):
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "out", **kw),
        train_dataset=TokenDataset(kind),
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(batching rule|bos_token|eos_token).*")
        trainer.train()
    return trainer


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = glob.glob(str(path / "events.*"))
    acc = EventAccumulator(event_file, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_gpt2_metrics_go_through_the_trainers_logging(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    # gamma off: the BERT tests run the default criterion; this one checks the LM path
    cb = CoherenceTrainerCallback(
        max_overhead=None, every_n_steps=2, probe_size=4, criterion="theorem1", lyapunov=False
    )
    trainer = _train(tmp_path, tiny_gpt2(), "causal_lm", [cb], max_steps=2, logging_steps=1)
    assert cb.probe.loss is causal_lm_loss
    assert [h["step"] for h in cb.history] == [0, 2]  # pre-flight, then the schedule
    assert all("error" not in h for h in cb.history), cb.history
    # the lookahead ran its short real runs with the per-sequence LM loss (no failure note)
    assert all("stability/blowup_lr" in h for h in cb.history), cb.history
    probed = [e for e in trainer.state.log_history if "coherence/sigma" in e]
    assert [e["step"] for e in probed] == [0, 2]
    assert probed[-1]["coherence/sigma"] == cb.history[-1]["coherence/sigma"]
    acc = _events(tmp_path / "tb")
    scalars = set(acc.Tags()["scalars"])
    assert {"train/coherence/sigma", "train/readable/gd_ratio", "train/loss"} <= scalars
    assert [e.step for e in acc.Scalars("train/coherence/sigma")] == [0, 2]
    ours = {t for t in scalars if is_coherence_tag(t.removeprefix("train/"))}
    assert len(ours) > 12
    for tag in ours:  # every probe tag carries its description in the summary metadata
        name = tag.removeprefix("train/")
        assert acc.SummaryMetadata(tag).summary_description == describe(name) != name, tag
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_the_guard_sees_the_loss_the_trainer_computed(tmp_path) -> None:
    seen = []
    cb = CoherenceTrainerCallback(max_overhead=None, every_n_steps=100, probe_size=8)
    observe = cb.probe.observe
    cb.probe.observe = lambda loss, lr: seen.append((float(loss), lr)) or observe(loss, lr)
    trainer = _train(tmp_path, tiny_bert(), "single_label", [cb], logging_steps=1)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert [lr for _, lr in seen] == [0.05] * 4
    assert [loss for loss, _ in seen] == pytest.approx(logged, rel=1e-5)
    assert [h["step"] for h in cb.history] == [0]  # only the pre-flight probe


def test_bert_weights_bit_identical_with_and_without_the_callback(tmp_path) -> None:
    plain = _train(tmp_path / "a", tiny_bert(), "single_label", []).model
    cb = CoherenceTrainerCallback(max_overhead=None, every_n_steps=2, probe_size=8)
    probed = _train(tmp_path / "b", tiny_bert(), "single_label", [cb]).model
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    assert isinstance(cb.probe.loss, torch.nn.CrossEntropyLoss)
    assert cb.history[0]["batch_size"] == 8.0
    a, b = plain.state_dict(), probed.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stop_sets_should_training_stop(tmp_path) -> None:
    cb = CoherenceTrainerCallback(
        max_overhead=None, every_n_steps=1, probe_size=8, on_unstable="stop"
    )
    # on_unstable acts on the lookahead's blow-up prediction (act_on="blowup", the default)
    with pytest.warns(BlowupWarning, match="predicted to blow up at learning rate 500"):
        trainer = _train(tmp_path, tiny_bert(), "single_label", [cb], learning_rate=500.0)
    # the pre-flight probe at step 0 asked to stop; the Trainer reads control after a step
    assert trainer.state.global_step == 1 and cb.history[0]["step"] == 0


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "targets", "expected"),
    [
        (3, None, torch.tensor([0, 2]), torch.nn.CrossEntropyLoss),
        (3, "single_label_classification", torch.tensor([0, 2]), torch.nn.CrossEntropyLoss),
        (2, None, torch.tensor([[0.0, 1.0]]), torch.nn.BCEWithLogitsLoss),
        (2, "multi_label_classification", torch.tensor([[0, 1]]), torch.nn.BCEWithLogitsLoss),
        (1, None, torch.tensor([0.5]), torch.nn.MSELoss),
        (1, "regression", torch.tensor([0.5]), torch.nn.MSELoss),
    ],
)
def test_loss_inferred_from_the_problem_type(num_labels, problem_type, targets, expected) -> None:
    assert type(infer_loss(tiny_bert(num_labels, problem_type), targets)) is expected


def test_causal_lm_loss_is_the_models_own_loss() -> None:
    model = tiny_gpt2().eval()
    ids = TokenDataset("causal_lm").ids[:3]
    out = model(input_ids=ids, labels=ids)
    per_sequence = torch.stack([causal_lm_loss(o, t) for o, t in zip(out.logits, ids, strict=True)])
    torch.testing.assert_close(per_sequence.mean(), out.loss)  # no padding: the same mean
    masked = ids.clone()
    masked[0, 3:] = -100
    keep = torch.nn.functional.cross_entropy(out.logits[0, :2], ids[0, 1:3])
    torch.testing.assert_close(causal_lm_loss(out.logits[0], masked[0]), keep)


def test_unknown_model_needs_a_loss() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=12,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    )
    with pytest.raises(ValueError, match=r"CoherenceTrainerCallback\(loss=torch\.nn\."):
        infer_loss(model, torch.tensor([0]))


def test_options_keyword_only_with_the_probes_names_and_defaults() -> None:
    import inspect

    from torch_coherence import CoherenceMonitor
    from torch_coherence.probe import EXTRA_OPTIONS, SHARED_OPTIONS, CoherenceProbe

    params = inspect.signature(CoherenceTrainerCallback).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    probe = inspect.signature(CoherenceProbe).parameters
    for name in (*SHARED_OPTIONS, *EXTRA_OPTIONS):
        assert params[name].default == probe[name].default, name
    cb = CoherenceTrainerCallback(act_on="linear", max_triggered=2, lookahead=False)
    assert (cb.probe.act_on, cb.probe.max_triggered, cb.probe.lookahead) == ("linear", 2, False)
    monitor = list(inspect.signature(CoherenceMonitor).parameters)
    ours = [n for n in params if n in monitor]
    assert ours == [n for n in monitor if n in params]  # the monitor's order


@pytest.mark.ddp
def test_two_processes_rank_zero_measures_and_broadcasts(tmp_path) -> None:
    """torchrun, 2 CPU processes (gloo): the same history on both ranks, training unaffected."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "hf_ddp_fit.py"
    for out, extra in ((tmp_path, []), (tmp_path / "plain", ["--no-callback"])):
        out.mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(port), str(script), str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    h0 = json.loads((tmp_path / "history_0.json").read_text())
    h1 = json.loads((tmp_path / "history_1.json").read_text())
    assert [h["step"] for h in h0] == [0, 2, 4] and h0 == h1  # one broadcast result
    assert h0[0]["batch_size"] == 8.0  # 4 per process x 2 processes
    logged = json.loads((tmp_path / "log_history.json").read_text())
    assert [e["step"] for e in logged if "coherence/sigma" in e] == [0, 2, 4]
    probed = torch.load(tmp_path / "weights.pt")
    plain = torch.load(tmp_path / "plain" / "weights.pt")
    for key, value in plain.items():
        assert torch.equal(value, probed[key]), key


def test_adjust_lr_survives_the_lr_scheduler(tmp_path) -> None:
    cb = CoherenceTrainerCallback(
        max_overhead=None, every_n_steps=2, probe_size=8, on_unstable="adjust_lr"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoherenceWarning)
        trainer = _train(tmp_path, tiny_bert(), "single_label", [cb], learning_rate=500.0)
    first, second = cb.history[0], cb.history[1]
    assert first["step"] == 0 and first["lr"] == 500.0
    # the pre-flight probe lowered the lr; the constant scheduler kept the lowered value, and
    # the probe's own lr change triggers nothing: the next probe is the scheduled one
    assert second["step"] == 2 and second["lr"] < 500.0
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert trainer.lr_scheduler.base_lrs == pytest.approx(lrs)  # the last change, kept too
