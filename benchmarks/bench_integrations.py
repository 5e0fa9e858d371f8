"""Seconds per probe through each integration, on the test suite's models (one CPU thread).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_integrations.py
Prints one row per integration: the model, the probe size m, the output dimension R, and
the median and range of ``probe/seconds`` over the probes of a short real run (the
pre-flight probe and two scheduled ones; default options, ``max_overhead=None``). Report it
with the load average it prints (2-core machines shared with other jobs inflate it).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.simplefilter("ignore")
for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "transformers"):
    logging.getLogger(name).setLevel(logging.ERROR)


def lightning_row(out: str) -> tuple[str, int, int, list[float]]:
    import pytorch_lightning as pl
    from integrations.helpers import TinyClassifier, trainer_kwargs

    from torch_coherence.callbacks import CoherenceCallback

    cb = CoherenceCallback(max_overhead=None, every_n_steps=3)
    pl.seed_everything(0)
    pl.Trainer(**trainer_kwargs(out, callbacks=[cb], max_steps=6)).fit(TinyClassifier())
    return "MLP 8-16-3 (BatchNorm, dropout)", 64, 3, [h["probe/seconds"] for h in cb.history]


def monitor_row(out: str) -> tuple[str, int, int, list[float]]:
    from integrations.helpers import TinyClassifier
    from torch.utils.data import DataLoader

    from torch_coherence import CoherenceMonitor

    torch.manual_seed(0)
    module = TinyClassifier()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    monitor = CoherenceMonitor(
        module, module.loss_fn, module.data, max_overhead=None, every_n_steps=3
    )
    monitor.start(opt, batch_size=16)
    for step, (x, y) in enumerate(DataLoader(module.data, batch_size=16)):
        opt.zero_grad()
        loss = module.loss_fn(module(x), y)
        loss.backward()
        opt.step()
        monitor.step(opt, 16, loss=loss)
        if step == 5:
            break
    return "MLP 8-16-3 (BatchNorm, dropout)", 64, 3, [h["probe/seconds"] for h in monitor.history]


def hf_row(out: str, kind: str) -> tuple[str, int, int, list[float]]:
    from integrations.hf_helpers import (
        SEQ_LEN,
        VOCAB,
        TokenDataset,
        tiny_bert,
        tiny_gpt2,
        training_args,
    )
    from transformers import PrinterCallback, Trainer

    from torch_coherence.callbacks import CoherenceTrainerCallback

    causal = kind == "causal_lm"
    m = 8 if causal else 64
    cb = CoherenceTrainerCallback(max_overhead=None, every_n_steps=3, probe_size=m)
    model = tiny_gpt2() if causal else tiny_bert()
    args = training_args(Path(out) / kind, max_steps=6, report_to=[])
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(kind), callbacks=[cb])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    name = (
        f"GPT-2 1 layer, d 16, V {VOCAB}, T {SEQ_LEN}"
        if causal
        else f"BERT 1 layer, d 16, 3 classes, T {SEQ_LEN}"
    )
    return (
        name,
        min(m, 48),
        VOCAB * SEQ_LEN if causal else 3,
        [h["probe/seconds"] for h in cb.history],
    )


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average before {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        rows.append(("Lightning", *lightning_row(out)))
        rows.append(("plain loop", *monitor_row(out)))
        rows.append(("Hugging Face", *hf_row(out, "single_label")))
        rows.append(("Hugging Face", *hf_row(out, "causal_lm")))
    print(f"threads {torch.get_num_threads()}")
    print("| integration | model | m | R | probes | s/probe median (min-max) |")
    print("|---|---|---|---|---|---|")
    for integ, model, m, r, secs in rows:
        med = statistics.median(secs)
        spread = f"{min(secs):.2f}-{max(secs):.2f}"
        print(f"| {integ} | {model} | {m} | {r} | {len(secs)} | {med:.2f} ({spread}) |")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
