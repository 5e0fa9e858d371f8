"""``torch-coherence demo``: the callback on the digits data, at a stable and an unstable lr.

Trains a small MLP on scikit-learn's bundled digits (n = 1797, no download) with plain SGD
and :class:`~torch_coherence.callbacks.CoherenceCallback`, first at a stable learning rate,
then, from the weights it reached, at a multiple of the critical learning rate the probe
reported. Both runs log to TensorBoard under ``--out``; the demo prints a table of the
numbers and the warnings and saves the curves as a PNG.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["add_demo", "run_demo"]


def _digits() -> Any:
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return TensorDataset(x, torch.tensor(y, dtype=torch.long))


def _module(lr: float, batch_size: int, data: Any) -> Any:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    class DigitsMLP(pl.LightningModule):
        """64-64-10 ReLU MLP; ``loss_fn`` is what the callback uses."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
            self.loss_fn = nn.CrossEntropyLoss()
            self.lr = lr

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            loss = self.loss_fn(logits, y)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
            self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(data, batch_size=batch_size, shuffle=True)

    return DigitsMLP()


def _fit(
    name: str, module: Any, args: argparse.Namespace, progress: bool
) -> tuple[Any, list[str], float, Any]:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from .callbacks import CoherenceCallback
    from .probe import CoherenceWarning

    # the whole Gram (m R = 2560 rows at the default 256 examples) so that gamma is computed
    cb = CoherenceCallback(
        max_overhead=None,
        every_n_steps=args.every,
        probe_size=args.probe_size,
        engine_kwargs={"return_gram": True},
    )
    logger = TensorBoardLogger(str(args.out), name="demo", version=name)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CoherenceWarning)
        trainer.fit(module)
    seconds = time.perf_counter() - start
    messages = []
    for w in caught:
        if issubclass(w.category, CoherenceWarning):
            messages.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return cb, messages, seconds, trainer


def _row(name: str, cb: Any, trainer: Any) -> dict[str, Any]:
    last = next(h for h in reversed(cb.history) if "stability/margin" in h)
    metrics = trainer.callback_metrics
    return {
        "run": name,
        "lr": last["lr"],
        "B": last["batch_size"],
        "sigma": last["coherence/sigma"],
        "sharpness": last["sharpness/ggn"],
        "T1 threshold": last["stability/theorem1_threshold"],
        "margin": last["stability/margin"],
        "critical lr": last["stability/critical_lr"],
        "critical B": last["stability/critical_batch_size"],
        "gamma": last.get("stability/lyapunov", math.nan),
        "typical crit lr": last.get("stability/typical_critical_lr", math.nan),
        "max margin": max(h.get("stability/margin", 0.0) for h in cb.history),
        "train loss": float(metrics.get("train/loss_epoch", math.nan)),
        "train acc": float(metrics.get("train/acc_epoch", math.nan)),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    cells = [[k] + [_cell(r[k]) for r in rows] for k in keys]
    width = [max(len(c) for c in col) for col in zip(*cells, strict=True)]
    for line in cells:
        pairs = enumerate(zip(line, width, strict=True))
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        print("  " + "  ".join(padded))


def _cell(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "inf" if math.isinf(v) else f"{v:.4g}"


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments (see :func:`add_demo`)."""
    import pytorch_lightning as pl
    import torch

    from .plotting import save_curves

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    progress = not args.no_progress
    args.out = Path(args.out)
    pl.seed_everything(args.seed, verbose=False)
    data = _digits()
    n = len(data)
    t0 = time.perf_counter()
    print(f"torch-coherence demo: digits MLP (n = {n}), SGD, batch size {args.batch_size}")
    print(f"[1/2] stable learning rate {args.lr:g}, {args.epochs} epochs")
    stable = _module(args.lr, args.batch_size, data)
    cb1, msgs1, s1, tr1 = _fit(f"stable_lr{args.lr:g}", stable, args, progress)
    crit = cb1.probe.last_report.critical_lr
    lr2 = args.factor * crit
    print(f"\nthe probe's critical learning rate at batch size {args.batch_size}: {crit:.4g}")
    print(f"[2/2] {args.factor:g} x critical = learning rate {lr2:.4g}, from the weights of [1/2]")
    unstable = _module(lr2, args.batch_size, data)
    unstable.load_state_dict(stable.state_dict())
    cb2, msgs2, s2, tr2 = _fit(f"unstable_lr{lr2:.3g}", unstable, args, progress)

    m = min(args.probe_size, n)
    print(f"\nSummary (last probe of each run; n = {n}, probe of {m} examples):")
    _print_table([_row("stable", cb1, tr1), _row("above critical", cb2, tr2)])
    print(f"\nwarnings: {len(msgs1)} in the stable run, {len(msgs2)} in the run above critical")
    for m in msgs1 + msgs2:
        print(f"  - {m}")
    offset = cb1.history[-1]["step"]
    history = cb1.history + [{**h, "step": h["step"] + offset} for h in cb2.history]
    png = save_curves(
        history,
        args.out / "demo" / "coherence_curves.png",
        title=f"digits MLP: lr {args.lr:g} then {lr2:.3g} (from step {offset})",
    )
    first, last = cb2.history[0], cb2.history[-1]
    print(
        f"\nabove critical, the sharpness went from {first['sharpness/ggn']:.3g} to "
        f"{last['sharpness/ggn']:.3g}: the theory predicts mean-square divergence of the "
        "dynamics linearized at the current weights; a network can leave those weights for "
        "flatter ones instead of blowing up, and the probe then reports the new margin."
    )
    print(f"\ncurves saved to {png}")
    print(f"fit times: {s1:.1f} s and {s2:.1f} s; total {time.perf_counter() - t0:.1f} s")
    print(f"open TensorBoard with:  tensorboard --logdir {args.out}  (then http://localhost:6006)")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    """Register the ``demo`` sub-command."""
    p = sub.add_parser(
        "demo",
        help="train a digits MLP at a stable and an unstable learning rate with the callback",
        description=(
            "Train a 64-64-10 MLP on the bundled digits data with SGD and CoherenceCallback, "
            "first at a stable learning rate, then at a multiple of the critical one; log to "
            "TensorBoard, print a summary and save the curves."
        ),
    )
    p.add_argument("--out", default="runs", help="TensorBoard log directory (default ./runs)")
    p.add_argument("--lr", type=float, default=0.05, help="the stable learning rate")
    p.add_argument("--factor", type=float, default=2.0, help="second run: factor x critical lr")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run")
    p.add_argument("--every", type=int, default=15, help="probe every N optimizer steps")
    p.add_argument("--probe-size", type=int, default=256, help="examples in the probe batch")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_demo)
