"""Paper 002, Appendix C.4/C.5: SGD against SAM on two-layer ReLU networks (MSE loss).

The claim tested (paper 002, Figures 3-4): SAM lowers the largest per-sample sharpness
max_i lambda_1(H_i) and lambda_1(S), the top eigenvalue of the coherence matrix
(docs/theory.md §2), and across optimizers the pairs (max_i lambda_1(H_i), lambda_1(S)) follow
one regression line.

Protocol. The paper's settings: eta = 0.01, B = 10, 50 epochs, SAM rho = 0.01 (here also 0.05
and 0.1), SGD and SAM from the same initialisation, several seeds. Sizes: ``small`` is C.5
(input 15, hidden 10, n = 50 training samples); ``large`` is C.4 (input 100, hidden 50; the
paper does not give n, ``--n-large`` sets it, default 100). The paper does not say how its data
are generated; here each seed draws a teacher-student regression: x ~ N(0, I_d), y = a random
two-layer ReLU teacher of the same shape, standardised to unit variance. Per seed, every
optimizer starts from the same student and sees the same batch order (B out of n without
replacement, reshuffled every epoch), so differences are paired.

Every epoch (and before training) the curvature is measured on the *whole* training set with
``torch_coherence.measure_curvature`` (probe = all n samples, so the numbers are exact for this
n, no extrapolation): H_i are the per-sample Gauss-Newton matrices of the MSE loss (equal to the
Hessians at interpolation; docs/theory.md §3). Output: per epoch the mean over seeds with a 95%
t-interval, the paired final-epoch differences SAM - SGD with 95% intervals, a least-squares
line lambda_1(S) = a + b max_i lambda_1(H_i) pooled over all optimizers, seeds and epochs with
the per-optimizer fits beside it, and a verdict per part of the claim. Everything runs on one
CPU thread; ``--size small`` takes well under a minute, ``--size both`` a few minutes.

Run:  OMP_NUM_THREADS=1 python examples/paper002_two_layer_relu.py --size both
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps
from torch import nn

from torch_coherence import measure_curvature
from torch_coherence.optim import SAM

#: (input dimension, hidden width, default number of training samples).
SIZES = {"small": (15, 10, 50), "large": (100, 50, 100)}
QUANTITIES = ("max_sample_sharpness", "lambda_S", "loss")
LABELS = {"max_sample_sharpness": "max_i l1(H_i)", "lambda_S": "l1(S)"}


def two_layer(d: int, h: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 1))


def make_data(d: int, h: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-student regression: x ~ N(0, I_d), y = teacher(x) standardised."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, d, generator=gen)
    torch.manual_seed(20_000 + seed)
    teacher = two_layer(d, h)
    with torch.no_grad():
        y = teacher(x)
    return x, (y - y.mean()) / y.std()


def curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """max_i lambda_1(H_i), lambda_1(S) and sigma on all n samples (exact for this n)."""
    rep = measure_curvature(model, x, y, nn.MSELoss(), sharpness=None)
    s = rep.stats
    with torch.no_grad():
        loss = float(nn.functional.mse_loss(model(x), y))
    return {
        "max_sample_sharpness": float(s.max_sample_sharpness),
        "lambda_S": float(s.lambda_S),
        "sigma": float(s.sigma),
        "loss": loss,
    }


def train(
    rho: float | None, x: torch.Tensor, y: torch.Tensor, h: int, seed: int, args
) -> list[dict[str, float]]:
    """One run; returns the curvature before training and after each epoch."""
    n, d = x.shape
    torch.manual_seed(seed)  # the same student for every optimizer of this seed
    model = two_layer(d, h)
    loss_fn = nn.MSELoss()
    if rho is None:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=args.lr)
    order = torch.Generator().manual_seed(30_000 + seed)  # the same batches for every optimizer
    history = [curvature(model, x, y)]
    for _ in range(args.epochs):
        for idx in torch.randperm(n, generator=order).split(args.batch_size):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            if rho is None:
                opt.step()
            else:
                opt.first_step(zero_grad=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.second_step(zero_grad=True)
        history.append(curvature(model, x, y))
    return history


def ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over the first axis."""
    k = values.shape[0]
    mean = float(values.mean())
    if k < 2:
        return mean, math.nan
    half = float(sps.t.ppf(0.975, k - 1) * values.std(ddof=1) / math.sqrt(k))
    return mean, half


def matched_loss(sgd: np.ndarray, sam: np.ndarray, qi: int) -> float:
    """SAM's final value minus SGD's value at the epoch where SGD had SAM's final loss.

    ``sgd``, ``sam``: (epochs + 1, quantity) histories of one seed. SGD's curve is
    interpolated linearly in the training loss between the two epochs that bracket SAM's
    final loss (the nearest epoch when no pair brackets it).
    """
    target = sam[-1, -1]
    loss, vals = sgd[:, -1], sgd[:, qi]
    for k in range(len(loss) - 1):
        lo, hi = sorted((loss[k], loss[k + 1]))
        if lo <= target <= hi and hi > lo:
            w = (target - loss[k]) / (loss[k + 1] - loss[k])
            return float(sam[-1, qi] - (vals[k] + w * (vals[k + 1] - vals[k])))
    return float(sam[-1, qi] - vals[int(np.argmin(np.abs(loss - target)))])


def print_curves(runs: dict[str, np.ndarray], epochs: int) -> None:
    names = list(runs)
    for qi, q in enumerate(QUANTITIES[:2]):
        print(f"{LABELS[q]}: mean over seeds +- 95% half-width\n")
        print("| epoch | " + " | ".join(names) + " |")
        print("|---:|" + "---:|" * len(names))
        step = max(1, epochs // 5)
        for ep in sorted(set(range(0, epochs + 1, step)) | {epochs}):
            cells = ["{:.4g} +- {:.2g}".format(*ci95(runs[nm][:, ep, qi])) for nm in names]
            print(f"| {ep} | " + " | ".join(cells) + " |")
        print()
    print(
        "final training loss, mean over seeds: "
        + ", ".join(f"{nm} {runs[nm][:, -1, -1].mean():.4g}" for nm in names)
    )


def print_differences(runs: dict[str, np.ndarray]) -> dict[str, bool]:
    """Paired SAM - SGD differences at the last epoch and at matched training loss."""
    names = list(runs)
    sgd = runs["SGD"]
    print(
        "\nPaired differences SAM - SGD (same seed), mean +- 95% half-width (relative to SGD):"
        " at the last epoch, and against SGD at the epoch where it had SAM's final loss\n"
    )
    print(
        "| optimizer | last epoch: d max_i l1(H_i) | d l1(S) | matched loss: d max_i l1(H_i)"
        " | d l1(S) |"
    )
    print("|---|---:|---:|---:|---:|")
    lowers = {}
    for nm in names[1:]:
        cells, ok = [], True
        for qi in range(2):
            mean, half = ci95(runs[nm][:, -1, qi] - sgd[:, -1, qi])
            cells.append(f"{mean:+.4g} +- {half:.2g} ({mean / sgd[:, -1, qi].mean():+.1%})")
            ok = ok and mean + half < 0
        for qi in range(2):
            diff = np.array([matched_loss(sgd[k], runs[nm][k], qi) for k in range(len(sgd))])
            mean, half = ci95(diff)
            cells.append(f"{mean:+.4g} +- {half:.2g} ({mean / runs[nm][:, -1, qi].mean():+.1%})")
        lowers[nm] = ok
        print(f"| {nm} | " + " | ".join(cells) + " |")
    return lowers


@dataclass
class Line:
    intercept: float
    slope: float
    r2: float


def fit_line(xs: np.ndarray, ys: np.ndarray) -> Line:
    res = sps.linregress(xs, ys)
    return Line(float(res.intercept), float(res.slope), float(res.rvalue**2))


def print_lines(runs: dict[str, np.ndarray]) -> tuple[float, float]:
    """Per seed: one line through all optimizers' points, and SAM's distance to SGD's line."""
    names = list(runs)
    seeds = runs["SGD"].shape[0]
    print(
        "\nLeast-squares lines l1(S) = a + b max_i l1(H_i) per seed (points: every epoch of "
        "every optimizer); 'SAM off SGD line': mean residual of the SAM points from the line "
        "fitted to SGD alone, relative to the mean l1(S)\n"
    )
    print("| seed | a | b | R^2 (all optimizers) | R^2 (SGD alone) | SAM off SGD line |")
    print("|---:|---:|---:|---:|---:|---:|")
    r2s, offs = [], []
    for k in range(seeds):
        xs = np.concatenate([runs[nm][k, :, 0] for nm in names])
        ys = np.concatenate([runs[nm][k, :, 1] for nm in names])
        pooled = fit_line(xs, ys)
        base = fit_line(runs["SGD"][k, :, 0], runs["SGD"][k, :, 1])
        sam_x = np.concatenate([runs[nm][k, :, 0] for nm in names[1:]])
        sam_y = np.concatenate([runs[nm][k, :, 1] for nm in names[1:]])
        off = float(np.mean(sam_y - (base.intercept + base.slope * sam_x)) / ys.mean())
        r2s.append(pooled.r2)
        offs.append(off)
        print(
            f"| {k} | {pooled.intercept:.4g} | {pooled.slope:.4g} | {pooled.r2:.4f} | "
            f"{base.r2:.4f} | {off:+.2%} |"
        )
    all_x = np.concatenate([runs[nm][:, :, 0].ravel() for nm in names])
    all_y = np.concatenate([runs[nm][:, :, 1].ravel() for nm in names])
    across = fit_line(all_x, all_y)
    print(f"| all seeds | {across.intercept:.4g} | {across.slope:.4g} | {across.r2:.4f} | | |")
    return min(r2s), max(abs(o) for o in offs)


def run_size(size: str, args) -> None:
    d, h, n = SIZES[size]
    if size == "large":
        n = args.n_large
    optimizers: dict[str, float | None] = {"SGD": None}
    optimizers.update({f"SAM rho={r:g}": r for r in args.rhos})
    t0 = time.perf_counter()
    runs: dict[str, np.ndarray] = {}  # (seeds, epochs + 1, quantity)
    for name, rho in optimizers.items():
        per_seed = []
        for seed in range(args.seeds):
            x, y = make_data(d, h, n, seed)
            per_seed.append([[e[q] for q in QUANTITIES] for e in train(rho, x, y, h, seed, args)])
        runs[name] = np.asarray(per_seed)
    wall = time.perf_counter() - t0
    print(
        f"\n### {size}: input {d}, hidden {h}, n = {n}, eta = {args.lr:g}, "
        f"B = {args.batch_size}, {args.epochs} epochs, {args.seeds} seeds ({wall:.1f} s)\n"
    )
    print_curves(runs, args.epochs)
    lowers = print_differences(runs)
    min_r2, max_off = print_lines(runs)
    print(
        "\nVerdict ('lowers': the 95% interval of the paired last-epoch difference lies below 0"
        " for both quantities; 'one line': within every seed R^2 >= 0.9 over all optimizers"
        " and the SAM points lie within 2% of the SGD line on average):"
    )
    for name, ok in lowers.items():
        print(f"  {name}: {'lowers' if ok else 'does NOT clearly lower'} max_i l1(H_i) and l1(S)")
    one = min_r2 >= 0.9 and max_off <= 0.02
    print(
        f"  one regression line: {'yes' if one else 'no'} (smallest within-seed R^2 "
        f"{min_r2:.3f}, largest |SAM off SGD line| {max_off:.2%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["small", "large", "both"], default="small")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--n-large", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for size in ("small", "large") if args.size == "both" else (args.size,):
        run_size(size, args)


if __name__ == "__main__":
    main()
