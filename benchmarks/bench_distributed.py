"""DDP probe cost: rank 0 measures and broadcasts, against the Gram's terms split over ranks.

Two gloo processes on the CPU (one thread each) hold the same model, as under DDP. Per
configuration, medians of ``--repeats`` after a warm-up, the two designs interleaved, each
timed on rank 0 from a barrier:

* ``rank 0 + broadcast``: rank 0 runs :func:`torch_coherence.measure_curvature` on the whole
  model (``sharpness=None``, ``return_gram=True``) and broadcasts the small result
  (``broadcast_object_list``); rank 1 only waits (what the Lightning callback does on DDP);
* ``split + all-reduce``: both ranks run
  :func:`torch_coherence.integrations.distributed.measure_curvature_sharded` (the same
  recording passes, half of the layer terms each, one all-reduce of K, the statistics on
  every rank).

Neither includes the Hessian Lanczos or the Lyapunov part of a full probe; both work on the
same K and are the same for both designs.

Run:  python benchmarks/bench_distributed.py --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "MLP 64-64-10": (64, 64, 10),
    "MLP 64-256-256-10": (64, 256, 256, 10),
}


def mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _time(fns: list, repeats: int) -> list[float]:
    """Medians of ``repeats`` timings of each function, interleaved (load drifts alike)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times, strict=True):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _rank0(rank: int, model: nn.Module, xb, yb, loss) -> None:
    from torch_coherence import measure_curvature

    box: list = [None]
    if rank == 0:
        rep = measure_curvature(model, xb, yb, loss, sharpness=None, return_gram=True)
        box = [(rep.stats.sigma, rep.stats.lambda_S, rep.ggn_sharpness)]
    dist.broadcast_object_list(box, src=0)


def _split(model: nn.Module, xb, yb, loss) -> None:
    from torch_coherence.integrations.distributed import measure_curvature_sharded

    measure_curvature_sharded(model, xb, yb, loss)


def worker(rank: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    loss = nn.CrossEntropyLoss()
    rows = []
    for name, widths in MODELS.items():
        torch.manual_seed(0)
        model = mlp(widths)
        for m in args.probe_sizes:
            xb, yb = x[:m], y[:m]
            t_rank0, t_split = _time(
                [
                    functools.partial(_rank0, rank, model, xb, yb, loss),
                    functools.partial(_split, model, xb, yb, loss),
                ],
                args.repeats,
            )
            rows.append({"model": name, "m": m, "rank0": t_rank0, "split": t_split})
    if rank == 0:
        (out / "rows.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe-sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(port, args, Path(tmp)), nprocs=2)
        rows = json.loads((Path(tmp) / "rows.json").read_text())
    print(
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; medians of "
        f"{args.repeats}; 2 gloo processes, 1 thread each\n"
    )
    print("| model | probe m | rank 0 + broadcast (s) | split + all-reduce (s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['m']} | {r['rank0']:.3f} | {r['split']:.3f} | "
            f"{r['split'] / r['rank0']:.2f} |"
        )


if __name__ == "__main__":
    main()
