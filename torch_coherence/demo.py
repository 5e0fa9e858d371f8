"""``torch-coherence demo``: the callback on the digits data, at a stable and an unstable lr.

Trains a small MLP on scikit-learn's bundled digits (n = 1797, no download) with plain SGD
and :class:`~torch_coherence.callbacks.CoherenceCallback`, first at a stable learning rate,
then, from the weights it reached, at a multiple of the blow-up learning rate the probe's
lookahead reported (``stability/blowup_lr``; the linear theory's critical learning rate when
the lookahead found none). Both runs log to TensorBoard under ``--out``; the demo prints a
table of the numbers, the warnings by category, and what the second run then really did
(blew up, or spiked and recovered, with the step and the loss), judged by the rule of
``benchmarks/bench_warnings.py``: the training loss non-finite or above 10x its first value.
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


#: A run blew up when its training loss is non-finite or above this multiple of its first
#: value (the rule of ``benchmarks/bench_warnings.py``).
BLOWUP_FACTOR = 10.0


def _loss_trace() -> Any:
    import pytorch_lightning as pl

    class LossTrace(pl.Callback):
        """The training loss of every optimizer step, as the loop computed it."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *_: Any) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return LossTrace()


def what_happened(losses: list[float], factor: float = BLOWUP_FACTOR) -> str:
    """One sentence: did the run blow up (step, loss; and did it recover), or not?

    Blow-up is the benchmark's rule: a training loss non-finite or above ``factor`` times
    the first step's loss.
    """
    if not losses:
        return "no optimizer step was taken"
    first, last = losses[0], losses[-1]
    for step, loss in enumerate(losses, start=1):
        if not math.isfinite(loss) or loss > factor * first:
            head = (
                f"training blew up at optimizer step {step}: loss {loss:.3g} against "
                f"{first:.3g} at the first step (non-finite or above {factor:g}x)"
            )
            if math.isfinite(last) and last <= 2 * first:
                return f"{head}, then recovered to {last:.3g} by step {len(losses)}"
            if math.isfinite(last):
                ratio = last / first
                return f"{head}, and ended at {last:.3g} ({ratio:.2g}x) at step {len(losses)}"
            return head
    peak = max(range(len(losses)), key=losses.__getitem__)
    ratio = losses[peak] / first if first > 0 else math.inf
    if ratio > 2 and last < losses[peak] / 2:
        return (
            f"no blow-up: the loss spiked to {ratio:.2g}x its first value at step {peak + 1} "
            f"and recovered to {last:.3g}"
        )
    return f"no blow-up: the loss went from {first:.3g} to {last:.3g} (peak {ratio:.2g}x)"


def _fit(
    name: str, module: Any, args: argparse.Namespace, progress: bool
) -> tuple[Any, list[tuple[str, str]], float, Any, list[float]]:
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
        callbacks=[cb, trace := _loss_trace()],
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
            messages.append((w.category.__name__, str(w.message)))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return cb, messages, seconds, trainer, trace.losses


def _row(name: str, cb: Any, trainer: Any, first: bool = False) -> dict[str, Any]:
    probes = [h for h in cb.history if "stability/margin" in h]
    if not probes:
        return {"run": name}
    h = probes[0] if first else probes[-1]
    metrics = trainer.callback_metrics
    return {
        "run": name,
        "probe at step": h["step"],
        "lr": h["lr"],
        "B": h["batch_size"],
        "sigma (n)": f"{h['coherence/sigma']:.4g} ({h.get('coherence/sigma_n', math.nan):.0f})",
        "sharpness": h["sharpness/ggn"],
        "T1 critical lr": h["stability/critical_lr"],
        "typical crit lr": h.get("stability/typical_critical_lr", math.nan),
        "blow-up lr": h.get("stability/blowup_lr", math.nan),
        "train loss (end)": float(metrics.get("train/loss_epoch", math.nan)),
        "train acc (end)": float(metrics.get("train/acc_epoch", math.nan)),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(max(rows, key=len))
    cells = [[k] + [_cell(r.get(k, "-")) for r in rows] for k in keys]
    width = [max(len(c) for c in col) for col in zip(*cells, strict=True)]
    for line in cells:
        pairs = enumerate(zip(line, width, strict=True))
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        print("  " + "  ".join(padded))


def _cell(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "inf" if math.isinf(v) else f"{v:.4g}"


def _report(
    runs: list[tuple[str, Any, Any, list[tuple[str, str]], list[float]]], n: int, m: int
) -> None:
    """The summary table, the warnings by category and what each run really did."""
    print(f"\nSummary (n = {n}, probe of {m} examples; later runs at their pre-flight probe):")
    _print_table([_row(name, cb, tr, i > 0) for i, (name, cb, tr, _, _) in enumerate(runs)])
    for name, _, _, msgs, _ in runs:
        label = f"the {name} run"
        kinds = sorted({k for k, _ in msgs})
        counts = ", ".join(f"{sum(k == c for k, _ in msgs)} {c}" for c in kinds) or "none"
        print(f"\nwarnings in {label}: {counts}")
        for kind, text in msgs:
            print(f"  - [{kind}] {text}")
    print("\nwhat really happened (blow-up: loss non-finite or above 10x its first value):")
    for name, _, _, msgs, losses in runs:
        predicted = any(kind == "BlowupWarning" for kind, _ in msgs)
        verdict = "predicted a blow-up (BlowupWarning)" if predicted else "predicted no blow-up"
        print(f"  the {name} run: {what_happened(losses)}; the probe {verdict}.")


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
    print(f"[1] stable learning rate {args.lr:g}, {args.epochs} epochs")
    stable = _module(args.lr, args.batch_size, data)
    cb1, msgs1, s1, tr1, loss1 = _fit(f"stable_lr{args.lr:g}", stable, args, progress)
    last = cb1.history[-1]
    blowup = float(last.get("stability/blowup_lr", math.inf))
    base, what = blowup, "blow-up"
    if not math.isfinite(blowup):  # the lookahead saw no blow-up up to its largest multiple
        base, what = cb1.probe.last_report.critical_lr, "Theorem 1 critical"
    lr2 = args.factor * base
    print(f"\nthe last probe's {what} learning rate at batch size {args.batch_size}: {base:.4g}")
    print(f"[2] {args.factor:g} x that = learning rate {lr2:.4g}, from the weights of [1]")
    unstable = _module(lr2, args.batch_size, data)
    unstable.load_state_dict(stable.state_dict())
    cb2, msgs2, s2, tr2, loss2 = _fit(f"unstable_lr{lr2:.3g}", unstable, args, progress)

    blow2 = float(cb2.history[0].get("stability/blowup_lr", math.inf))
    runs = [
        ("stable", cb1, tr1, msgs1, loss1),
        (f"{args.factor:g}x {what}", cb2, tr2, msgs2, loss2),
    ]
    if math.isfinite(blow2):
        lr3 = 1.5 * blow2
        print(
            f"\n[3] 1.5 x the blow-up lr {blow2:.4g} that [2]'s pre-flight lookahead found = "
            f"learning rate {lr3:.4g}, from the weights of [1], 1 epoch"
        )
        third = _module(lr3, args.batch_size, data)
        third.load_state_dict(stable.state_dict())
        short = argparse.Namespace(**{**vars(args), "epochs": 1})
        cb3, msgs3, _, tr3, loss3 = _fit(f"blowup_lr{lr3:.3g}", third, short, progress)
        runs.append(("1.5x blow-up lr", cb3, tr3, msgs3, loss3))

    _report(runs, n, min(args.probe_size, n))
    offset = cb1.history[-1]["step"]
    history = cb1.history + [{**h, "step": h["step"] + offset} for h in cb2.history]
    png = save_curves(
        history,
        args.out / "demo" / "coherence_curves.png",
        title=f"digits MLP: lr {args.lr:g} then {lr2:.3g} (from step {offset})",
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
            "first at a stable learning rate, then at a multiple of the blow-up learning rate "
            "the probe's lookahead found; log to TensorBoard, print a summary, the warnings "
            "and what the second run really did, and save the curves."
        ),
    )
    p.add_argument("--out", default="runs", help="TensorBoard log directory (default ./runs)")
    p.add_argument("--lr", type=float, default=0.05, help="the stable learning rate")
    p.add_argument("--factor", type=float, default=2.0, help="second run: factor x the blow-up lr")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run")
    p.add_argument("--every", type=int, default=50, help="probe every N optimizer steps")
    p.add_argument("--probe-size", type=int, default=256, help="examples in the probe batch")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_demo)
