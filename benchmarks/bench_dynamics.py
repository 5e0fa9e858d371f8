"""Cost of the dynamics computations a probe makes, before and after, on a real probe Gram.

The Gram: a 64-64-10 tanh MLP on scikit-learn's digits (n = 1797), trained 300 SGD steps
(lr 0.1, B = 32, seed 0), then :func:`torch_coherence.measure_curvature` on 64 training
examples with ``return_gram=True`` (exact cross-entropy factors, C = 10: a (64, 10, 64, 10)
Gram, coefficient space r = 576).

Rows (each timed ``--repeats`` times, baseline and current interleaved so that both see
the same machine load; the median is reported):

* ``probe Lyapunov part``: what the probe's Lyapunov metrics compute: the reduction to
  the coefficient space, gamma at the probe's lr (lr 0.1, B = 32, n = 1797) and the
  typical critical lr, with the probe's protocol (200 steps, 4 repeats, rel_tol 2e-2,
  seed 0). The current code is timed with the default ``band=True`` (as the probe calls
  it) and with ``band=False`` (central root only).
* ``gamma``, ``typical critical lr``: the two calls alone (coefficient space given).
* exact rows (``critical_lr_exact`` with and without momentum 0.9,
  ``critical_batch_size_exact``, ``mean_square_rate`` with momentum 0.9; B = 32,
  n = 1797): each baseline and current call in its own fresh process (time, value and the
  process's peak resident memory), stopped after ``--exact-timeout`` seconds.

The baseline is the package at ``--baseline`` (a git revision of this repository,
default f9e5125), extracted with ``git archive`` into a temporary directory and imported
under another name, so both run in this process on the same inputs.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_dynamics.py [--repeats 3] [--baseline REV]
                                                            [--exact-timeout 60]
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch_coherence as tc  # noqa: E402
from torch_coherence.dynamics.curvature_space import as_coefficient_curvature  # noqa: E402

PROTOCOL = {"steps": 200, "repeats": 4, "seed": 0}
LR, B, N_DATA = 0.1, 32, 1797


def probe_gram(path: Path | None = None) -> torch.Tensor:
    """The (64, 10, 64, 10) Gram of the trained digits MLP (see the module docstring)."""
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(X), (B,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    idx = torch.randperm(len(X), generator=gen)[:64]
    rep = tc.measure_curvature(model, X[idx], y[idx], nn.CrossEntropyLoss(), n=len(X),
                               return_gram=True)  # fmt: skip
    gram = rep.gram.detach().to(torch.float64)
    if path is not None:
        torch.save(gram, path)
    return gram


def baseline_package(rev: str, into: Path) -> str:
    """Extract ``torch_coherence`` at ``rev`` as package ``tc_baseline`` under ``into``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "torch_coherence"],
                          capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "torch_coherence").rename(into / "tc_baseline")
    sys.path.insert(0, str(into))
    importlib.import_module("tc_baseline")
    return "tc_baseline"


def lyapunov_part(pkg, gram: torch.Tensor, **extra) -> tuple[float, float]:
    """The probe's Lyapunov metrics: (gamma, typical critical lr)."""
    dyn = importlib.import_module(f"{pkg}.dynamics")
    space = importlib.import_module(f"{pkg}.dynamics.curvature_space")
    cc = space.as_coefficient_curvature(gram, "gram")
    g = dyn.lyapunov_exponent(cc, LR, B, N_DATA, **PROTOCOL)
    c = dyn.critical_lr_typical(cc, B, N_DATA, rel_tol=2e-2, **PROTOCOL, **extra)
    return g.value, c.lr


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


EXACT_CHILD = """
import resource, sys, time, warnings, torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
sys.path.insert(0, {into!r})
import {pkg}.dynamics as dyn
gram = torch.load({gram!r})
t0 = time.perf_counter()
value = dyn.{call}
secs = time.perf_counter() - t0
print(secs, float(value), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

#: The exact (rho(T)) computations: name -> call on ``gram`` (B = 32, n = 1797).
EXACT_CALLS = {
    "critical_lr_exact": f"critical_lr_exact(gram, {B}, {N_DATA})",
    "critical_lr_exact, momentum 0.9": f"critical_lr_exact(gram, {B}, {N_DATA}, momentum=0.9)",
    "critical_batch_size_exact (lr 0.5)": f"critical_batch_size_exact(gram, 0.5, {N_DATA})",
    "critical_batch_size_exact, mom. 0.9": (
        f"critical_batch_size_exact(gram, 0.1, {N_DATA}, momentum=0.9)"
    ),
    "mean_square_rate, momentum 0.9": f"mean_square_rate(gram, {LR}, {B}, {N_DATA}, momentum=0.9)",
}


def exact_in_subprocess(pkg: str, into: Path, gram_path: Path, call: str, timeout: float):
    """(seconds, value, peak resident MiB of the child) or (None, None, None) on timeout."""
    code = EXACT_CHILD.format(into=str(into), pkg=pkg, gram=str(gram_path), call=call)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env, check=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, None, None
    secs, value, rss = proc.stdout.split()
    return float(secs), float(value), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default="f9e5125")
    ap.add_argument("--exact-timeout", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gram_path = tmp / "gram.pt"
        gram = probe_gram(gram_path)
        base = baseline_package(args.baseline, tmp)
        cc_new = as_coefficient_curvature(gram, "gram")
        bdyn = importlib.import_module(f"{base}.dynamics")
        cc_old = importlib.import_module(f"{base}.dynamics.curvature_space")
        cc_old = cc_old.as_coefficient_curvature(gram, "gram")
        cases = {
            "probe Lyapunov part (band=False)": (
                lambda: lyapunov_part(base, gram),
                lambda: lyapunov_part("torch_coherence", gram, band=False)),
            "probe Lyapunov part, band=True": (
                lambda: lyapunov_part(base, gram),
                lambda: lyapunov_part("torch_coherence", gram, band=True)),
            "gamma (lr 0.1)": (
                lambda: bdyn.lyapunov_exponent(cc_old, LR, B, N_DATA, **PROTOCOL).value,
                lambda: tc.lyapunov_exponent(cc_new, LR, B, N_DATA, **PROTOCOL).value),
            "typical critical lr": (
                lambda: bdyn.critical_lr_typical(cc_old, B, N_DATA, rel_tol=2e-2, **PROTOCOL).lr,
                lambda: tc.critical_lr_typical(cc_new, B, N_DATA, rel_tol=2e-2, band=False,
                                               **PROTOCOL).lr),
        }  # fmt: skip
        rows = []
        for name, (old, new) in cases.items():
            t_old, t_new = [], []
            for _ in range(args.repeats):
                dt, v_old = timed(old)
                t_old.append(dt)
                dt, v_new = timed(new)
                t_new.append(dt)
            rows.append((name, statistics.median(t_old), statistics.median(t_new), v_old, v_new,
                         None, None))  # fmt: skip
        for name, call in EXACT_CALLS.items():
            t_old, v_old, m_old = exact_in_subprocess(base, tmp, gram_path, call,
                                                      args.exact_timeout)  # fmt: skip
            t_new, v_new, m_new = exact_in_subprocess("torch_coherence", ROOT, gram_path, call,
                                                      args.exact_timeout)  # fmt: skip
            rows.append((name, t_old, t_new, v_old, v_new, m_old, m_new))
    load = os.getloadavg()
    print(
        f"one thread (torch {torch.__version__}), load average {load0[0]:.2f} at the start, "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; median of {args.repeats} "
        f"(exact rows: 1 run each in a fresh process, peak resident memory of that process)"
    )
    head = f"{'computation':<36} {'baseline s':>11} {'now s':>8} {'ratio':>7} {'MiB old/now':>12}"
    print(head + "  values (baseline / now, relative difference)")
    for name, a, b, va, vb, ma, mb in rows:
        tmo = args.exact_timeout
        if b is None:
            now_s, speed = f">{tmo:.0f}", "?"
        else:
            now_s = f"{b:.3f}"
            speed = f">{tmo / b:.0f}x" if a is None else f"{a / b:.1f}x"
        base_s = f">{tmo:.0f}" if a is None else f"{a:.3f}"
        mem = "" if ma is None and mb is None else f"{_fmt_mem(ma)}/{_fmt_mem(mb)}"
        vals = f"{_fmt(va)} / {_fmt(vb)}{_rel(va, vb)}"
        print(f"{name:<36} {base_s:>11} {now_s:>8} {speed:>7} {mem:>12}  {vals}")


def _fmt_mem(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _rel(a, b) -> str:
    if a is None or b is None:
        return ""
    pairs = list(zip(a, b, strict=True)) if isinstance(a, tuple) else [(a, b)]
    diffs = [abs(x - y) / max(abs(x), 1e-300) for x, y in pairs]
    return ", " + "/".join(f"{d:.1e}" for d in diffs)


def _fmt(v) -> str:
    if v is None:
        return "not finished"
    if isinstance(v, tuple):
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
    return f"{v:.6g}"


if __name__ == "__main__":
    main()
