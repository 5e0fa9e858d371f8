"""Cost of one probe in training steps, by part, and the probes a real fit gets (two tables).

Table 1, for each model: the wall time of a training step (SGD, batch B), then the probe's
parts at the trained weights, each timed ``--repeats`` times (median): the base probe (the
curvature engine on the m = 64 probe batch with the assessment, ``estimates="probe"``), the
data-set estimates the default adds when the training set is known (the training loss's
sharpness by Lanczos over all n = 1797 examples, warm-started as at a later probe, and
sigma_n: exact for n <= 500, else the PPS estimate with m = 256), the light probe (the
tracked sharpness on a fresh batch of 64), the blow-up lookahead and, with ``--gamma``, gamma
with the typical critical lr. ``/ step`` columns are costs in training steps.

Table 2, for each model: a real fit of ``--fit-steps`` SGD steps in a plain loop with
:class:`~torch_coherence.probe.CoherenceProbe` at its defaults (``every_n_steps=100``,
``max_overhead=0.03``, data-set estimates, light probes, lookahead), counting the probes by
kind and the time they took: "budgeted" is the scheduled share (full and light probes,
against the 3% budget), "all" adds the pre-flight and triggered probes, which are outside it.

    OMP_NUM_THREADS=1 python benchmarks/bench_probe_cost.py [--repeats 3] [--gamma]

State ``uptime`` next to the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter

import torch
from torch import nn


def _digits() -> torch.utils.data.TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.utils.data.TensorDataset(
        torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    )


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 64, 10),
    )


MODELS = {"mlp": ("digits MLP 64-64-10", _mlp), "cnn": ("digits CNN 16-32", _cnn)}


def _median(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


class _Stepper:
    """SGD steps on shuffled batches of B (the training the probe watches)."""

    def __init__(self, model: nn.Module, data: object, batch_size: int, lr: float = 0.1):
        self.model, self.loss = model, nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        self.loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True
        )
        self.it = iter(self.loader)

    def __call__(self) -> torch.Tensor:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            x, y = next(self.it)
        self.opt.zero_grad()
        out = self.loss(self.model(x), y)
        out.backward()
        self.opt.step()
        return out.detach()


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def parts_row(key: str, data: object, args: argparse.Namespace) -> str:
    """Table 1: the model trained ``args.steps`` steps, then its probe's parts timed."""
    from torch_coherence.curvature import dataset_sharpness, tracked_sharpness
    from torch_coherence.probe import CoherenceProbe
    from torch_coherence.probe.light import draw_batch

    name, build = MODELS[key]
    model = build()
    step = _Stepper(model, data, args.batch_size)
    for _ in range(args.steps):
        step()
    step_s = _median(lambda: [step() for _ in range(50)], args.repeats) / 50

    def probe_with(**kw) -> CoherenceProbe:
        kw.setdefault("criterion", "theorem1")
        kw.setdefault("lyapunov", False)
        kw.setdefault("lookahead", False)
        return CoherenceProbe(
            loss=step.loss, probe=data, dataset_size=len(data), max_overhead=None, **kw
        )

    def run(p: CoherenceProbe) -> None:
        _quiet(lambda: p.run(model, step.opt, args.batch_size, warn=lambda *_: None))

    base = _median(lambda: run(probe_with(estimates="probe")), args.repeats)
    warm = probe_with()  # the default: data-set estimates; the second run is warm-started
    run(warm)
    full = _median(lambda: run(warm), args.repeats)
    dataset = max(full - base, 0.0)
    with_la = _median(lambda: run(probe_with(estimates="probe", lookahead=True)), args.repeats)
    lookahead = max(with_la - base, 0.0)
    vector = dataset_sharpness(model, step.loss, data, seed=0).vector
    x, y = draw_batch(data, 64, 0, 1, torch.device("cpu"))
    tracked_sharpness(model, step.loss, x, y, vector)  # forward-mode AD's one-time load
    light = _median(
        lambda: tracked_sharpness(model, step.loss, x, y, vector, n=len(data)), args.repeats
    )
    gamma = "-"
    if args.gamma:
        g = _median(
            lambda: run(probe_with(estimates="probe", criterion="typical", lyapunov=True)), 1
        )
        gamma = f"{1e3 * max(g - base, 0.0):.0f}"
    return (
        f"{name} | {args.batch_size} | {1e3 * step_s:.2f} | {1e3 * base:.0f} | "
        f"{1e3 * dataset:.0f} | {1e3 * full:.0f} | {1e3 * light:.1f} | {1e3 * lookahead:.0f} | "
        f"{gamma} | {base / step_s:.0f} | {full / step_s:.0f} | {light / step_s:.1f}"
    )


def fit_row(key: str, data: object, batch_size: int, steps: int) -> str:
    """Table 2: a real fit with the default probe; probes by kind and their share of time."""
    from torch_coherence.probe import CoherenceProbe

    name, build = MODELS[key]
    model = build()
    step = _Stepper(model, data, batch_size)
    probe = CoherenceProbe(loss=step.loss, probe=data, dataset_size=len(data))
    probe.attach(step.opt)
    probe.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        if probe.due():
            _quiet(lambda: probe.run(model, step.opt, batch_size, warn=lambda *_: None))
        loss = step()
        probe.observe(loss, step.opt.param_groups[0]["lr"])
    if probe.due():
        _quiet(lambda: probe.run(model, step.opt, batch_size, warn=lambda *_: None))
    wall = time.perf_counter() - t0
    probe.detach()
    sched = probe.schedule
    train = sched.training_seconds()
    kinds = Counter(h["kind"] for h in probe.history)
    lights = [h["probe/seconds"] for h in probe.history if h["kind"] == "light"]
    light = statistics.median(lights) if lights else float("nan")
    per_step = train / max(steps, 1)
    outside = sched.outside_seconds
    counts = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    asked = sum("escalate" in h for h in probe.history)
    counts += f"; {asked} asked by a light probe"
    return (
        f"{name} | {batch_size} | {steps} | {1e3 * per_step:.2f} | {len(probe.history)} "
        f"({counts}) | {1e3 * light:.1f} ({light / per_step:.1f} steps) | "
        f"{100 * sched.probe_seconds / train:.2f}% | {outside:.1f} s | "
        f"{100 * (sched.probe_seconds + outside) / train:.1f}% | {wall:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="training steps before probing")
    parser.add_argument("--gamma", action="store_true", help="also time gamma (slow)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--fit-steps", type=int, default=1000)
    parser.add_argument(
        "--fit", default="mlp:32,cnn:32,cnn:128", help="model:B pairs of the real fits"
    )
    parser.add_argument("--no-parts", action="store_true")
    args = parser.parse_args()
    data = _digits()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, n = {len(data)}")
    if not args.no_parts:
        print(
            "model | B | step ms | base ms | dataset estimates ms | default full ms | light ms"
            " | lookahead ms | gamma ms | base / step | full / step | light / step"
        )
        for key in args.models.split(","):
            print(parts_row(key, data, args), flush=True)
    if args.fit_steps > 0 and args.fit:
        print(
            "model | B | steps | step ms | probes (by kind) | light probe | budgeted | "
            "outside (pre-flight, triggered) | all | fit wall"
        )
        for item in args.fit.split(","):
            key, b = item.split(":")
            print(fit_row(key, data, int(b), args.fit_steps), flush=True)


if __name__ == "__main__":
    main()
