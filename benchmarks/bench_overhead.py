"""Fit time with and without CoherenceCallback at its default settings.

Two models on scikit-learn's digits (n = 1797, batch size 32, plain SGD): the 64-64-10 MLP
of the demo and a small CNN (two 3x3 convolutions on the 8x8 images). For each model the
runs alternate (without, with, without, with, ...) in one process, each from the same
initial weights and seed; the table gives the median fit times, their ratio and the mean
seconds per probe.

Run:  python benchmarks/bench_overhead.py [--epochs 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_coherence.callbacks import CoherenceCallback


def digits(image: bool) -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return TensorDataset(x, torch.tensor(y))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, data: TensorDataset) -> None:
        super().__init__()
        self.net, self.data = net, data
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=32, shuffle=True)


def fit_seconds(make, data, epochs: int, callback: CoherenceCallback | None) -> float:
    pl.seed_everything(0, verbose=False)
    module = Module(make(), data)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback] if callback else [],
    )
    start = time.perf_counter()
    trainer.fit(module)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="CoherenceCallback overhead at defaults")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    defaults = CoherenceCallback()
    print(
        f"defaults: every_n_steps={defaults.probe.every_n_steps}, "
        f"probe_size={defaults.probe.probe_size}, sharpness={defaults.probe.sharpness!r}; "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    for label, make, image in (("digits MLP", mlp, False), ("digits CNN", cnn, True)):
        data = digits(image)
        fit_seconds(make, data, 1, None)  # warm-up
        fit_seconds(make, data, 1, CoherenceCallback(every_n_steps=10))
        plain, probed, per_probe, probes = [], [], [], 0
        for _ in range(args.repeats):
            plain.append(fit_seconds(make, data, args.epochs, None))
            cb = CoherenceCallback()
            probed.append(fit_seconds(make, data, args.epochs, cb))
            secs = [h["probe/seconds"] for h in cb.history if "probe/seconds" in h]
            per_probe += secs
            probes = len(cb.history)
        steps = args.epochs * -(-len(data) // 32)
        a, b = statistics.median(plain), statistics.median(probed)
        rows.append((label, steps, probes, a, b, b / a, statistics.mean(per_probe or [0.0])))
    print(
        "| model | optimizer steps | probes | fit without (s) | fit with (s) | ratio | "
        "seconds per probe |\n|---|---|---|---|---|---|---|"
    )
    for label, steps, probes, a, b, ratio, pp in rows:
        print(f"| {label} | {steps} | {probes} | {a:.2f} | {b:.2f} | {ratio:.3f} | {pp:.3f} |")


if __name__ == "__main__":
    main()
