"""Tiny Lightning models and data for the integration tests (CPU, seconds each)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_TRAIN, N_FEATURES, N_CLASSES = 96, 8, 3


def make_dataset(seed: int = 0, n: int = N_TRAIN) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=gen)
    w = torch.randn(N_FEATURES, N_CLASSES, generator=gen)
    return TensorDataset(x, (x @ w).argmax(1))


class TinyClassifier(pl.LightningModule):
    """MLP with BatchNorm and dropout; ``loss_fn`` is found by the callback."""

    def __init__(self, lr: float = 0.05, batch_size: int = 16, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(N_FEATURES, 16)]
        if norm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, N_CLASSES)]
        self.net = nn.Sequential(*layers)
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr = lr
        self.batch_size = batch_size
        self.data = make_dataset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def trainer_kwargs(tmp_path, **kw) -> dict:
    base = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        max_epochs=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    base.update(kw)
    return base
