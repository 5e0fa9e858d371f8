"""Cost of one probe in training steps, by part, on small models (prints a table).

For each model: the wall time of a training step (SGD, batch B), then the probe's parts at
the trained weights, each timed ``--repeats`` times (median): the curvature engine with the
assessment (the base probe), the blow-up lookahead and gamma with the typical critical lr
(the optional parts), and the data-set-wide estimates of ``estimates="dataset"``.
``probe / step`` is the cost in training steps; the last column is
how many scheduled probes a fit of 1000 steps gets under the default schedule
(``min(10, 0.03 x 1000 / cost)``; the pre-flight probe comes on top).

    OMP_NUM_THREADS=1 python benchmarks/bench_probe_cost.py [--repeats 3]

State ``uptime`` next to the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn


def _digits() -> torch.utils.data.TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.utils.data.TensorDataset(
        torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    )


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cnn = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 64, 10),
    )
    return {"digits MLP 64-64-10": mlp, "digits CNN 16-32": cnn}


def _median(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="training steps before probing")
    args = parser.parse_args()
    data = _digits()
    loss = nn.CrossEntropyLoss()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B = {args.batch_size}")
    head = "model | step ms | base ms | lookahead ms | gamma ms | dataset estimates ms"
    head += " | base / step | all / step"
    print(head + " | scheduled probes in 1000 steps")
    for name, model in _models().items():
        print(_row(name, model, data, loss, args))


def _row(name: str, model: nn.Module, data: object, loss: nn.Module, args: object) -> str:
    """One table row: the model trained ``args.steps`` steps, then its probe's parts timed."""
    from torch_coherence.probe import CoherenceProbe

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    it = iter(loader)

    def step() -> None:
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()

    for _ in range(args.steps):
        step()
    step_s = _median(lambda: [step() for _ in range(50)], args.repeats) / 50

    def probe_with(**kw) -> CoherenceProbe:
        kw.setdefault("criterion", "theorem1")
        return CoherenceProbe(
            loss=loss, probe=data, dataset_size=len(data), max_overhead=None, **kw
        )

    def run(p: CoherenceProbe) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.run(model, opt, args.batch_size, warn=lambda *_: None)

    base = _median(lambda: run(probe_with(lookahead=False, lyapunov=False)), args.repeats)
    with_la = _median(lambda: run(probe_with(lyapunov=False)), args.repeats)
    with_g = _median(lambda: run(probe_with(lookahead=False, criterion="typical")), 1)
    with_d = _median(
        lambda: run(probe_with(lookahead=False, lyapunov=False, estimates="dataset")), 1
    )
    la, gamma = max(with_la - base, 0.0), max(with_g - base, 0.0)
    dataset = max(with_d - base, 0.0)
    sched = min(10, int(0.03 * 1000 * step_s / base))
    return (
        f"{name} | {1e3 * step_s:.2f} | {1e3 * base:.1f} | {1e3 * la:.1f} | "
        f"{1e3 * gamma:.0f} | {1e3 * dataset:.0f} | {base / step_s:.1f} | "
        f"{(base + la + gamma) / step_s:.0f} | "
        f"{sched}"
    )


if __name__ == "__main__":
    main()
