"""Cost of the curvature engine's self-check on the digits MLP (prints a table).

The digits MLP 64-256-256-10 (85,002 parameters, ReLU) of ``bench_curvature.py``, trained 3
epochs of SGD (lr 0.1, batch 32), probed on m = 256 digits with cross-entropy (R = 10 rows +
the gradient row). Each configuration is timed ``--repeats`` times (median) with
``sharpness="ggn"``; the self-check costs V backward passes (V = ``self_check``) of the
recording graph plus V products with the factors.
Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_selfcheck.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from torch_coherence.curvature import measure_curvature


def workload(m: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The digits MLP and probe of ``bench_curvature.py`` (trained there, m = 256)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_curvature import build_workloads, load

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workloads.pt"
        build_workloads(path)
        model, data = load(path, "mlp")
    return model, data["mlp_x"][:m], data["mlp_y"][:m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, x, y = workload(args.m)
    loss = nn.CrossEntropyLoss()
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, m = {args.m}")
    print(f"{'self_check':>10} {'median s':>9} {'min s':>7} {'passes':>6} {'check error':>12}")
    base = None
    for v in (0, 2, 4):
        times, rep = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            rep = measure_curvature(model, x, y, loss, sharpness="ggn", self_check=v)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        base = med if base is None else base
        print(
            f"{v:>10} {med:>9.3f} {min(times):>7.3f} {rep.self_check_passes:>6} "
            f"{rep.self_check_error:>12.1e}  ({med / base:.3f}x)"
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
