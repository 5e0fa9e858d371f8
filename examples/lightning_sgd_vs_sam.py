"""Lightning: SGD against SAM on digits, both with CoherenceCallback.

SAM runs under manual optimization with a closure passed to ``opt.step`` (SAM evaluates
it twice, at w and at w + e); going through Lightning's ``opt.step`` keeps
``trainer.global_step`` counting. (Calling ``opt.optimizer.first_step()`` /
``second_step()`` directly also trains, but Lightning then never advances ``global_step``,
so ``max_steps`` would never be reached.) The callback counts optimizer steps through a
hook on SAM's base optimizer, so its schedule is right either way.

Run:  python examples/lightning_sgd_vs_sam.py      (about a minute on a laptop CPU)
Then: tensorboard --logdir runs/sgd_vs_sam
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_coherence.callbacks import CoherenceCallback
from torch_coherence.optim import SAM


def digits() -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))


class Classifier(pl.LightningModule):
    """64-64-10 MLP; ``sam_rho=None`` trains with SGD, otherwise with SAM."""

    def __init__(self, lr: float = 0.1, sam_rho: float | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.loss_fn = nn.CrossEntropyLoss()  # the callback picks this up
        self.lr, self.sam_rho = lr, sam_rho
        self.automatic_optimization = sam_rho is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            loss = self.loss_fn(self(x), y)
        else:
            opt = self.optimizers()  # Lightning's wrapper of the SAM instance

            def closure() -> torch.Tensor:  # SAM evaluates it at w and at w + e
                opt.zero_grad()
                loss = self.loss_fn(self(x), y)
                self.manual_backward(loss)
                return loss

            loss = opt.step(closure=closure)  # SAM.step: first_step, closure, second_step
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        if self.sam_rho is None:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return SAM(self.parameters(), torch.optim.SGD, rho=self.sam_rho, lr=self.lr)


def main(epochs: int = 5) -> None:
    data = digits()
    results = {}
    for name, rho in (("sgd", None), ("sam", 0.05)):
        pl.seed_everything(0)
        model = Classifier(sam_rho=rho)
        cb = CoherenceCallback(max_overhead=None, every_n_steps=20, probe_size=256)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=TensorBoardLogger("runs", name="sgd_vs_sam", version=name),
            callbacks=[cb],
            enable_checkpointing=False,
            log_every_n_steps=10,
        )
        trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True))
        results[name] = cb.history[-1]
    print(f"{'':6s} {'sharpness':>10s} {'sigma':>8s} {'margin':>8s} {'critical lr':>12s}")
    for name, h in results.items():
        print(
            f"{name:6s} {h['sharpness/ggn']:10.4g} {h['coherence/sigma']:8.4g} "
            f"{h['stability/margin']:8.4g} {h['stability/critical_lr']:12.4g}"
        )


if __name__ == "__main__":
    main()
