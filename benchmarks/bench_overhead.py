"""Fit time with and without CoherenceCallback at its default settings.

Two models on scikit-learn's digits (n = 1797, batch size 32, plain SGD): the 64-64-10 MLP
of the demo and a small CNN (two 3x3 convolutions on the 8x8 images). The callback is
``CoherenceCallback()`` exactly as a user writes it: the real curvature engine
(:func:`torch_coherence.measure_curvature`) and every default. For each model the runs
alternate in one process (without/with, then with/without, ...; with ``--noop`` the three
kinds rotate), each from the same initial weights and seed, after one warm-up fit of each
kind.

The table gives the median wall time of ``trainer.fit`` and the median CPU time of the
process during it (``time.process_time``: on a shared machine it is much less disturbed by
other jobs than the wall time), their ratios with/without, the probes taken and the mean
seconds per probe. ``--noop`` adds a third kind of run with a Lightning callback that does
nothing: its CPU ratio is what Lightning's dispatch of any callback's hooks costs (about
10 microseconds a step), which no callback can avoid. ``--logger tensorboard`` gives every
run a ``TensorBoardLogger`` (in a temporary directory), so that the callback's logging and
phase-plane figures are counted.

Run:  python benchmarks/bench_overhead.py [--epochs 100] [--repeats 5] [--threads 1]
                                          [--logger none|tensorboard] [--models mlp,cnn]
                                          [--noop]

``--ddp`` measures the distributed design instead: for each model a 2-process
``strategy="ddp"`` fit (``--ddp-epochs``, default 4) on CPU (gloo, one thread per process,
32 examples per device) with the callback probing every 25 optimizer steps; rank zero
measures and broadcasts the small result. Reported per probe: the time rank zero spends in
it (measurement and broadcast), the time rank one waits, the broadcast alone, and, for the
alternative of splitting the Gram over the ranks, the all-reduce of the float64 Gram of
size (m R)^2 and the probe restricted to each half of the parameter blocks
(``engine_kwargs={"params": ...}``: what one rank of the split would compute), all against
the single-process probe on the same final weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_coherence.callbacks import CoherenceCallback

BATCH_SIZE = 32


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


MODELS = {"mlp": ("digits MLP", mlp, False), "cnn": ("digits CNN", cnn, True)}


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
        return DataLoader(self.data, batch_size=BATCH_SIZE, shuffle=True)


class NoOp(pl.Callback):
    """A callback without hooks of its own: the cost of being a callback at all."""


def fit_seconds(
    make, data, epochs: int, callback: pl.Callback | None, logger: str = "none"
) -> tuple[float, float]:
    """(wall, process CPU) seconds of one ``trainer.fit`` from the seeded initial weights."""
    pl.seed_everything(0, verbose=False)
    module = Module(make(), data)
    with tempfile.TemporaryDirectory() as tmp:
        if logger == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            log: object = TensorBoardLogger(tmp, name="bench")
        else:
            log = False
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=log,
            default_root_dir=tmp,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback] if callback else [],
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(module)
        return time.perf_counter() - wall, time.process_time() - cpu


class TimedCallback(CoherenceCallback):
    """Records the wall time of each :meth:`run_probe` on this rank (rank one: waiting)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds: list[float] = []

    def run_probe(self, trainer, pl_module):
        start = time.perf_counter()
        try:
            return super().run_probe(trainer, pl_module)
        finally:
            self.seconds.append(time.perf_counter() - start)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ddp_run(key: str, out: Path, epochs: int) -> None:
    """One 2-process DDP fit (Lightning re-runs this command for rank one)."""
    import torch.distributed as dist

    from torch_coherence.probe import CoherenceProbe

    label, make, image = MODELS[key]
    data = digits(image)
    pl.seed_everything(0, verbose=False)
    module = Module(make(), data)
    cb = TimedCallback(every_n_steps=25, max_overhead=None, log_figures=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=epochs,
            logger=False,
            default_root_dir=tmp,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb],
        )
        trainer.fit(module)
    rank = trainer.global_rank
    m = cb.probe.probe_size
    classes = 10
    gram = torch.randn(m * classes, m * classes, dtype=torch.float64)
    result = cb.history[-1]  # about the size of a ProbeResult
    dist.barrier()
    allreduce = _median_seconds(lambda: dist.all_reduce(gram), 10)
    payload = [None]

    def bcast() -> None:
        payload[0] = result if rank == 0 else None
        dist.broadcast_object_list(payload, src=0)

    broadcast = _median_seconds(bcast, 10)
    dist.barrier()
    stats = {"rank": rank, "run_probe": cb.seconds, "allreduce": allreduce, "bcast": broadcast}
    if rank == 0:
        stats["measure"] = [h["probe/seconds"] for h in cb.history]
        net = trainer.lightning_module
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        batch = 32 * trainer.world_size

        def probe_time(params: list[str] | None) -> float:
            kw = {"engine_kwargs": {"params": params}} if params else {}
            probe = CoherenceProbe(
                loss=net.loss_fn, probe=data, dataset_size=len(data), max_overhead=None, **kw
            )
            probe.measure(net, opt, batch)  # warm-up
            return _median_seconds(lambda: probe.measure(net, opt, batch), 5)

        names = [n for n, p in net.named_parameters() if p.requires_grad]
        sizes = dict((n, p.numel()) for n, p in net.named_parameters())
        half, acc = [], 0
        for name in names:  # the first blocks holding about half of the parameters
            if acc < sum(sizes.values()) / 2:
                half.append(name)
                acc += sizes[name]
        rest = [n for n in names if n not in half]
        stats.update(
            single=probe_time(None),
            half_a=probe_time(half),
            half_b=probe_time(rest),
            halves=[half, rest],
            gram_mb=gram.numel() * 8 / 2**20,
            label=label,
        )
    (out / f"ddp_{key}_{rank}.json").write_text(json.dumps(stats))
    dist.barrier()
    dist.destroy_process_group()


def ddp_main(args: argparse.Namespace) -> None:
    """Run :func:`ddp_run` per model in a fresh process and print the table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            cmd = [sys.executable, __file__, "--ddp-run", key, "--out", tmp]
            cmd += ["--threads", str(args.threads or 1), "--epochs", str(args.ddp_epochs)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            r0 = json.loads((Path(tmp) / f"ddp_{key}_0.json").read_text())
            r1 = json.loads((Path(tmp) / f"ddp_{key}_1.json").read_text())
            rows.append((r0, r1))
    print(
        "| model | probes | single-process probe (s) | DDP rank 0 per probe (s) | "
        "rank 1 waits (s) | broadcast (ms) | half A probe (s) | half B probe (s) | "
        "Gram all-reduce (ms) | Gram MB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r0, r1 in rows:
        print(
            f"| {r0['label']} | {len(r0['run_probe'])} | {r0['single']:.3f} "
            f"| {statistics.median(r0['run_probe']):.3f} "
            f"| {statistics.median(r1['run_probe']):.3f} | {r0['bcast'] * 1e3:.2f} "
            f"| {r0['half_a']:.3f} | {r0['half_b']:.3f} | {r0['allreduce'] * 1e3:.2f} "
            f"| {r0['gram_mb']:.2f} |"
        )
    for r0, _ in rows:
        print(f"{r0['label']}: halves {r0['halves']}")


def main() -> None:
    parser = argparse.ArgumentParser(description="CoherenceCallback overhead at defaults")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--logger", choices=("none", "tensorboard"), default="none")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--noop", action="store_true", help="also time a no-op callback")
    parser.add_argument("--ddp", action="store_true", help="measure the DDP design instead")
    parser.add_argument("--ddp-epochs", type=int, default=4, help="epochs of each DDP fit")
    parser.add_argument("--ddp-run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.ddp_run:
        ddp_run(args.ddp_run, Path(args.out), args.epochs)
        return
    if args.ddp:
        ddp_main(args)
        return
    defaults = CoherenceCallback()
    print(
        f"defaults: every_n_steps={defaults.probe.every_n_steps}, "
        f"probe_size={defaults.probe.probe_size}, sharpness={defaults.probe.sharpness!r}, "
        f"max_overhead={defaults.probe.max_overhead}, log_figures={defaults.log_figures}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; logger {args.logger}; "
        f"{args.epochs} epochs x {args.repeats} repeats"
    )
    rows = []
    for key in args.models.split(","):
        label, make, image = MODELS[key]
        data = digits(image)
        fit_seconds(make, data, 1, None, args.logger)  # warm-up
        fit_seconds(make, data, 1, CoherenceCallback(every_n_steps=10), args.logger)
        kinds = ("without", "with", "noop") if args.noop else ("without", "with")
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        per_probe: list[float] = []
        probes = 0
        for rep in range(args.repeats):
            cb = CoherenceCallback()
            callbacks = {"without": None, "with": cb, "noop": NoOp()}
            shift = rep % len(kinds)  # each kind takes each place in the order in turn
            for kind in kinds[shift:] + kinds[:shift]:
                times[kind].append(
                    fit_seconds(make, data, args.epochs, callbacks[kind], args.logger)
                )
            per_probe += [h["probe/seconds"] for h in cb.history if "probe/seconds" in h]
            probes = len(cb.history)
        steps = args.epochs * -(-len(data) // BATCH_SIZE)
        wall = {k: statistics.median(t[0] for t in times[k]) for k in kinds}
        cpu = {k: statistics.median(t[1] for t in times[k]) for k in kinds}
        noop = f"{cpu['noop'] / cpu['without']:.3f}" if args.noop else "-"
        mean_probe = statistics.mean(per_probe or [0.0])
        row = (label, steps, probes, wall["without"], wall["with"], cpu["without"], cpu["with"])
        rows.append((*row, noop, mean_probe))
    print(
        "| model | optimizer steps | probes | wall without (s) | wall with (s) | wall ratio | "
        "CPU without (s) | CPU with (s) | CPU ratio | no-op callback CPU ratio | "
        "seconds per probe |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for label, steps, probes, a, b, c, d, noop, pp in rows:
        print(
            f"| {label} | {steps} | {probes} | {a:.2f} | {b:.2f} | {b / a:.3f} | {c:.2f} "
            f"| {d:.2f} | {d / c:.3f} | {noop} | {pp:.3f} |"
        )


if __name__ == "__main__":
    main()
