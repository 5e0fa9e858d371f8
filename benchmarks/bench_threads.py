"""What the thread count does to the demo and to one probe, on an idle and on a loaded CPU.

For every (busy, threads) pair the script starts ``busy`` CPU-bound processes (``while True:
pass``; it starts them and stops them by their pid), then runs in a fresh subprocess with
``OMP_NUM_THREADS=threads`` (and ``torch.set_num_threads(threads)``, which the demo also
honours):

* ``probe``: one full probe of the demo's setting (the digits MLP 64-64-10 after one epoch of
  SGD, a probe of 256 examples, the Lyapunov part included: ``CoherenceProbe.measure``),
  median of ``--repeats`` after one warm-up;
* ``demo``: the reduced demo ``torch-coherence demo --epochs 1 --every 30 --no-progress``
  (two one-epoch fits of 57 steps with the callback, one probe each; ``--demo-args``), wall
  clock and CPU time (all threads) of the whole subprocess (``--skip-demo`` to leave it out).

CPU time above wall time means several threads ran; CPU time that grows with the thread count
while wall time does not is threads waiting for each other (spinning) instead of working.

``threads = 0`` means "not set": no ``OMP_NUM_THREADS`` in the environment and no
``torch.set_num_threads`` (PyTorch's default, the number of physical cores). The load average
(``os.getloadavg``) is printed before and after every cell: the machine may be shared.

Run:  python benchmarks/bench_threads.py --threads 1 2 --busy 0 1 --repeats 1   (docs/threads.md;
      30 minutes on the loaded 2-core machine, most of it in the 2-thread cells)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_probe(repeats: int, probe_size: int) -> None:
    """Print the median seconds of one probe (run inside the configured subprocess)."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import TensorDataset

    from torch_coherence.probe import CoherenceProbe

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for idx in torch.randperm(len(x)).split(32):  # one epoch, as in the demo
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    probe = CoherenceProbe(
        loss=loss_fn,
        probe=TensorDataset(x, y),
        probe_size=probe_size,
        dataset_size=len(x),
        max_overhead=None,
        engine_kwargs={"return_gram": True},
    )
    probe.measure(model, opt, 32)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        probe.measure(model, opt, 32)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(
        json.dumps(
            {
                "probe": statistics.median(times),
                "probe_cpu": statistics.median(cpu),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=10)


def cell(threads: int, busy: int, args: argparse.Namespace) -> dict[str, float | str]:
    load_before = os.getloadavg()[0]
    procs = _busy(busy)
    try:
        time.sleep(1.0 if busy else 0.0)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-probe",
                str(args.repeats),
                "--probe-size",
                str(args.probe_size),
            ],
            env=_env(threads),
            capture_output=True,
            text=True,
            check=True,
        )
        row: dict[str, float | str] = json.loads(out.stdout.strip().splitlines()[-1])
        if not args.skip_demo:
            cmd = [sys.executable, "-m", "torch_coherence", "demo", *args.demo_args.split()]
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(
                    [*cmd, "--no-progress", "--out", tmp],
                    env=_env(threads),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row["demo"] = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                row["demo_cpu"] = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    finally:
        _stop(procs)
    row["load_before"] = load_before
    row["load_after"] = os.getloadavg()[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument(
        "--demo-args", default="--epochs 1 --every 30", help="options of the reduced demo"
    )
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--child-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_probe is not None:
        child_probe(args.child_probe, args.probe_size)
        return
    print(f"{os.cpu_count()} logical CPUs; {time.strftime('%H:%M:%S UTC', time.gmtime())}")
    print(f"probe of {args.probe_size} examples; reduced demo: demo {args.demo_args}")
    print(
        "\n| busy processes | OMP_NUM_THREADS | torch threads | probe wall (s) | probe CPU (s) "
        "| demo wall (s) | demo CPU (s) | load before | load after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for busy in args.busy:
        for threads in args.threads:
            r = cell(threads, busy, args)
            demo = f"{r['demo']:.1f} | {r['demo_cpu']:.1f}" if "demo" in r else "- | -"
            print(
                f"| {busy} | {threads or 'unset'} | {r['torch_threads']} | {r['probe']:.2f} | "
                f"{r['probe_cpu']:.2f} | {demo} | {r['load_before']:.2f} | "
                f"{r['load_after']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
