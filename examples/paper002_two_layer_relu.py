"""Paper 002, Appendix C.4/C.5: SGD against SAM on a two-layer ReLU network with MSE loss.

Tracks, once per epoch and on the whole training set (probe = all n examples, so the numbers
are exact for this n), the largest per-sample sharpness max_i lambda_1(H_i) and
lambda_1(S), the top eigenvalue of the coherence matrix, for SGD and for SAM from the same
initialisation. Settings of the paper: B = 10, rho = 0.01, eta = 0.01, 50 epochs;
``--size large``: input 100, hidden 50 (n = 100, which the paper does not state);
``--size small``: input 15, hidden 10, n = 50.

The data here is a synthetic teacher-student regression (the paper's data is not
published): x ~ N(0, I/d), y = a teacher two-layer ReLU network of the same shape.
H_i are the per-sample Gauss-Newton matrices (equal to the Hessians at interpolation).

Run:  python examples/paper002_two_layer_relu.py --size small   (well under a minute)
      python examples/paper002_two_layer_relu.py --size large   (a few minutes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from torch_coherence import CoherenceMonitor
from torch_coherence.optim import SAM

SIZES = {"large": (100, 50, 100), "small": (15, 10, 50)}  # input, hidden, n


def two_layer(d: int, h: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 1))


def train(name: str, d: int, h: int, x, y, epochs: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)  # same initialisation for SGD and SAM
    model = two_layer(d, h)
    loss_fn = nn.MSELoss()
    lr, batch, rho = 0.01, 10, 0.01
    if name == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = x.shape[0]
    monitor = CoherenceMonitor(
        model, loss_fn, (x, y), n, every_n_steps=n // batch, max_overhead=None, margin_warning=None
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch):
            xb, yb = x[idx], y[idx]
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            if name == "sam":
                opt.first_step(zero_grad=True)
                loss_fn(model(xb), yb).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step()
            monitor.step(opt, batch_size=batch)
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    print(f"{name}: final training loss {final:.4g}")
    return monitor.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/paper002")
    args = parser.parse_args()
    d, h, n = SIZES[args.size]
    gen = torch.Generator().manual_seed(1000 + args.seed)
    x = torch.randn(n, d, generator=gen) / d**0.5
    teacher = two_layer(d, h)
    with torch.no_grad():
        y = teacher(x) * 3.0
    runs = {name: train(name, d, h, x, y, args.epochs, args.seed) for name in ("sgd", "sam")}

    print(
        f"\n{'epoch':>5} | {'SGD max_i l1(H_i)':>17} {'SGD l1(S)':>10} | "
        f"{'SAM max_i l1(H_i)':>17} {'SAM l1(S)':>10}"
    )
    for k in range(0, args.epochs, max(1, args.epochs // 10)):
        a, b = runs["sgd"][k], runs["sam"][k]
        print(
            f"{k + 1:5d} | {a['coherence/max_sample_sharpness']:17.4g} "
            f"{a['coherence/lambda_S']:10.4g} | {b['coherence/max_sample_sharpness']:17.4g} "
            f"{b['coherence/lambda_S']:10.4g}"
        )
    fig = Figure(figsize=(9, 3.5), dpi=100)
    for i, tag in enumerate(("coherence/max_sample_sharpness", "coherence/lambda_S")):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, hist in runs.items():
            ax.plot(range(1, len(hist) + 1), [e[tag] for e in hist], label=name.upper())
        ax.set_xlabel("epoch")
        ax.set_title("max_i lambda_1(H_i)" if i == 0 else "lambda_1(S)")
        ax.legend()
    fig.suptitle(f"two-layer ReLU, input {d}, hidden {h}, n = {n}, B = 10, eta = rho = 0.01")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out / f"two_layer_{args.size}.png"))
    print(f"figure saved to {out / f'two_layer_{args.size}.png'}")


if __name__ == "__main__":
    main()
