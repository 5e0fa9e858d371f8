"""How good are the sharpness and sigma estimates? Probe estimates against full-data values.

Setups (all trained for real with SGD before measuring, float32 models):

* ``mlp_ce``: digits MLP 64-256-256-10, cross-entropy, 300 SGD steps (B = 32, lr 0.1), n = 1797.
* ``mlp_ce_long``: the same MLP after 2000 steps (99.4% training accuracy): less aligned, a
  heavier tail of per-sample curvature (the hard case for a uniform probe).
* ``demo_mlp``: the demo's 64-64-10 ReLU MLP, CE, 342 SGD steps (6 epochs of B = 32 at
  lr 0.05, as ``torch-coherence demo`` trains it), n = 1797; ``demo_mlp_300ep`` after 17100
  steps (300 epochs; 100% training accuracy, the least aligned of all).
* ``cnn_ce``: digits CNN 1x8x8 -> conv8 -> pool -> conv16 -> pool -> linear10, CE, 300 steps
  (B = 32, lr 0.1), n = 1797.
* ``mse_teacher``: 20-64-64-1 tanh MLP on a random 20-32-1 tanh teacher plus noise, MSE,
  300 steps (B = 32, lr 0.05), n = 2000.
* ``bce_mlp``: the 64-8-1 tanh MLP of ``tests/curvature/test_full_data.py`` (digit >= 5, BCE,
  100 full-batch GD steps at lr 0.5, float64), n = 1797.
* ``mse_8000``: the teacher problem with n = 8000, so that ``dataset_sharpness`` and
  ``estimate_sigma`` sample 2048 of 8000 examples (exact sigma_n: all 8000^2 pairs).

Parts:

(s) sharpness: the GGN and Hessian sharpness of a probe of m = 64 / 256 (``measure_curvature``,
    5 probe draws), ``dataset_sharpness`` (all n when n <= 2048, else a sample of 2048; 5 seeds
    for ``mse_8000``) and the full-data reference (Lanczos over all n to 1e-8; on the MLP/CNN
    cross-checked with scipy ``eigsh`` on the same products).
(g) sigma: the exact sigma_n (``exact_sigma``: the streaming engine on all n), then for probes
    of m = 64 / 256 (``--draws`` draws) every estimator of ``estimate_sigma``.
(e) edge of stability: full-batch GD from the untrained ``mse_teacher`` student at eta = 0.3
    (2/eta = 6.67; its sharpness starts at 5.1 and GD sharpens it to 2/eta): the probe's
    Hessian sharpness (m = 64) against the true full-batch value, and dataset_sharpness.

(t) cost: exact_sigma on the first 250 / 500 / 1000 digits against estimate_sigma and
    dataset_sharpness on all 1797 (mlp_ce, cnn_ce).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_estimates.py [--parts sget] [--draws 5]
The exact sigma_n and S_n are cached in ``--cache`` (default /tmp/tc_estimates_cache).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from torch_coherence.curvature import dataset_sharpness, measure_curvature


# ------------------------------------------------------------------------------- setups
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def _sgd(model, loss, X, Y, steps, lr, batch, seed) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss(model(X[idx]), Y[idx]).backward()
        opt.step()
    return model


def teacher_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.randn(20, 32, generator=gen) / 20**0.5
    W2 = torch.randn(32, 1, generator=gen) / 32**0.5
    X = torch.randn(n, 20, generator=gen)
    Y = torch.tanh(X @ W1) @ W2 * 3 + 0.1 * torch.randn(n, 1, generator=gen)
    return X, Y


def setup(name: str):
    """(model, loss, X, Y) of a named setup, trained deterministically."""
    torch.manual_seed(0)
    if name in ("mlp_ce", "mlp_ce_long"):
        X, Y = _digits()
        model = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        loss = nn.CrossEntropyLoss()
        steps = 300 if name == "mlp_ce" else 2000
        return _sgd(model, loss, X, Y, steps, 0.1, 32, 0), loss, X, Y
    if name in ("demo_mlp", "demo_mlp_300ep"):
        X, Y = _digits()
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        loss = nn.CrossEntropyLoss()
        steps = 342 if name == "demo_mlp" else 17100
        return _sgd(model, loss, X, Y, steps, 0.05, 32, 0), loss, X, Y
    if name == "cnn_ce":
        X, Y = _digits()
        X = X.view(-1, 1, 8, 8)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        loss = nn.CrossEntropyLoss()
        return _sgd(model, loss, X, Y, 300, 0.1, 32, 0), loss, X, Y
    if name in ("mse_teacher", "mse_8000"):
        X, Y = teacher_data(2000 if name == "mse_teacher" else 8000)
        model = nn.Sequential(
            nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
        )
        loss = nn.MSELoss()
        return _sgd(model, loss, X, Y, 300, 0.05, 32, 0), loss, X, Y
    if name == "bce_mlp":
        X, T = _digits()
        X, Y = X.double(), (T >= 5).double()[:, None]
        model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        loss = nn.BCEWithLogitsLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(100):
            opt.zero_grad()
            loss(model(X), Y).backward()
            opt.step()
        return model, loss, X, Y
    raise ValueError(f"unknown setup {name!r}")


SIGMA_SETUPS = (
    "mlp_ce",
    "cnn_ce",
    "mse_teacher",
    "bce_mlp",
    "mlp_ce_long",
    "mse_8000",
    "demo_mlp",
    "demo_mlp_300ep",
)
SHARP_SETUPS = ("mlp_ce", "cnn_ce", "mse_teacher", "mse_8000")


def exact_cache(name: str, cache: Path) -> dict:
    """sigma_n, S_n (n x n) and the per-sample lambda_1(H_i) of all n examples, cached."""
    from torch_coherence.curvature.sigma_estimate import exact_sigma, per_sample_curvature

    path = cache / f"{name}.pt"
    if path.exists():
        return torch.load(path)
    model, loss, X, Y = setup(name)
    t0 = time.perf_counter()
    est, S = exact_sigma(model, loss, (X, Y), return_S=True)
    t1 = time.perf_counter()
    sweep = per_sample_curvature(model, loss, (X, Y), max_samples=None)
    t2 = time.perf_counter()
    out = {
        "sigma": est.value,
        "S": S,
        "lam": sweep.sharpness,
        "n": X.shape[0],
        "seconds_exact": t1 - t0,
        "seconds_per_sample": t2 - t1,
        "load": os.getloadavg()[0],
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _stats(errs: list[float]) -> str:
    return f"{statistics.median(errs):+7.1%} {min(errs):+7.1%} {max(errs):+7.1%}"


def _l1(M: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(M)[-1])


# ------------------------------------------------------------------------------- (g) sigma
def part_sigma(setups: list[str], draws: int, cache: Path) -> None:
    from torch_coherence.curvature.sigma_estimate import estimate_sigma, sigma_from_probe

    print("\n(g) sigma_n: exact (all n^2 pairs) against estimates from probes of m examples")
    print("    rel. error over draws: median / min / max; 'uniform' rows from uniform probes")
    print("    (S_m = the principal submatrix of the exact S_n on the probe), 'pps' rows are")
    print("    estimate_sigma() calls (O(n) pass + PPS probe), timed; z = (est - exact)/stderr")
    head = f"{'setup':12s} {'n':>5s} {'m':>4s} {'estimator':26s} {'median':>7s} {'min':>7s}"
    head += f" {'max':>7s}"
    for name in setups:
        c = exact_cache(name, cache)
        S, lam, n, exact = c["S"], c["lam"], c["n"], c["sigma"]
        print(
            f"\n{name}: n = {n}, exact sigma_n = {exact:.2f} ({c['seconds_exact']:.1f} s, "
            f"load {c['load']:.1f}); max_i lambda_1(H_i) over n = {float(lam.max()):.1f}, "
            f"O(n) pass {c['seconds_per_sample']:.2f} s"
        )
        print(head + f" {'stderr/value':>12s} {'rms z':>6s} {'seconds':>8s}")
        model, loss, X, Y = setup(name)
        for m in (64, 256):
            rows: dict[str, list[float]] = {
                "probe sigma_m": [],
                "uniform, probe max (old)": [],
                "uniform, max over n": [],
            }
            ses: dict[str, list[float]] = {k: [] for k in rows}
            zs: dict[str, list[float]] = {k: [] for k in rows}
            for seed in range(draws):
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
                Sm, lm = S[idx][:, idx], lam[idx]
                rows["probe sigma_m"].append(_l1(Sm) / float(lm.max()) / exact - 1)
                for key, den in (
                    ("uniform, probe max (old)", float(lm.max())),
                    ("uniform, max over n", float(lam.max())),
                ):
                    e = sigma_from_probe(Sm, n, den, seed=seed)
                    rows[key].append(e.value / exact - 1)
                    ses[key].append(e.stderr / e.value)
                    zs[key].append((e.value - exact) / e.stderr)
            secs = []
            rows["pps (estimate_sigma)"], ses["pps (estimate_sigma)"] = [], []
            zs["pps (estimate_sigma)"] = []
            for seed in range(draws):
                t0 = time.perf_counter()
                e = estimate_sigma(model, loss, (X, Y), m=m, seed=seed)
                secs.append(time.perf_counter() - t0)
                rows["pps (estimate_sigma)"].append(e.value / exact - 1)
                ses["pps (estimate_sigma)"].append(e.stderr / e.value)
                zs["pps (estimate_sigma)"].append((e.value - exact) / e.stderr)
            for key, errs in rows.items():
                se = f"{statistics.median(ses[key]):12.1%}" if ses.get(key) else " " * 12
                z = (
                    f"{math.sqrt(sum(v * v for v in zs[key]) / len(zs[key])):6.2f}"
                    if zs.get(key)
                    else " " * 6
                )
                t = f"{statistics.median(secs):8.2f}" if key.startswith("pps") else ""
                print(f"{name:12s} {n:5d} {m:4d} {key:26s} {_stats(errs)} {se} {z} {t}")


# --------------------------------------------------------------------------- (s) sharpness
def _reference(model, loss, X, Y, kind: str) -> tuple[float, float, float]:
    """Full-data lambda_1 by dataset_sharpness (tol 1e-8) and by scipy eigsh on the same
    products (tol 1e-8); returns (lanczos, eigsh, seconds of the lanczos one)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    from torch_coherence._state import preserved_state
    from torch_coherence.curvature.gram import Forward
    from torch_coherence.curvature.sharpness import _product

    t0 = time.perf_counter()
    ref = dataset_sharpness(
        model, loss, (X, Y), kind=kind, max_samples=None, tol=1e-8, max_iter=200
    )
    secs = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    with preserved_state(model):
        mv = _product(
            kind,
            Forward(model, None),
            loss,
            list(torch.split(torch.arange(len(X)), 512)),
            (X, Y),
            params,
            len(X),
        )
        op = LinearOperator(
            (dim, dim), matvec=lambda v: mv(torch.from_numpy(v.ravel())).numpy(), dtype="float64"
        )
        val = float(eigsh(op, k=1, which="LA", tol=1e-8, v0=ref.vector.numpy())[0][0])
    return ref.value, val, secs


def part_sharpness(setups: list[str], draws: int) -> None:
    print("\n(s) sharpness of the training loss: probe (measure_curvature on m uniform examples)")
    print("    and dataset_sharpness (defaults: all n if n <= 2048, else 2048 sampled) against the")
    print("    full-data value (Lanczos over all n, tol 1e-8; eigsh on the same products)")
    print(
        f"{'setup':12s} {'n':>5s} {'kind':8s} {'full':>9s} {'eigsh':>9s} {'estimate':28s} "
        f"{'median':>7s} {'min':>7s} {'max':>7s} {'seconds':>8s} {'products':>8s}"
    )
    for name in setups:
        model, loss, X, Y = setup(name)
        n = X.shape[0]
        for kind in ("ggn", "hessian"):
            full, eig, fsecs = _reference(model, loss, X, Y, kind)
            pre = f"{name:12s} {n:5d} {kind:8s} {full:9.4f} {eig:9.4f}"
            for m in (64, 256):
                errs, secs = [], []
                for seed in range(draws):
                    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
                    t0 = time.perf_counter()
                    rep = measure_curvature(
                        model,
                        X[idx],
                        Y[idx],
                        loss,
                        sharpness="both" if kind == "hessian" else "ggn",
                    )
                    secs.append(time.perf_counter() - t0)
                    v = rep.hessian_sharpness if kind == "hessian" else rep.ggn_sharpness
                    errs.append(v / full - 1)
                print(
                    f"{pre} {'probe m=' + str(m):28s} {_stats(errs)} {statistics.median(secs):8.2f}"
                )
            errs, secs, its = [], [], []
            for seed in range(draws if n > 2048 else 1):
                t0 = time.perf_counter()
                r = dataset_sharpness(model, loss, (X, Y), kind=kind, seed=seed)
                secs.append(time.perf_counter() - t0)
                errs.append(r.value / full - 1)
                its.append(r.iterations)
            label = f"dataset_sharpness N={r.n_samples}"
            print(
                f"{pre} {label:28s} {_stats(errs)} {statistics.median(secs):8.2f} "
                f"{statistics.median(its):8.0f}"
            )
            # warm start after one SGD step (lr 0.01, one batch of 32)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            snapshot = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            loss(model(X[:32]), Y[:32]).backward()
            opt.step()
            t0 = time.perf_counter()
            w = dataset_sharpness(model, loss, (X, Y), kind=kind, init_vector=r.vector)
            wsecs = time.perf_counter() - t0
            c = dataset_sharpness(model, loss, (X, Y), kind=kind)
            print(
                f"{pre} {'  warm after 1 SGD step':28s} {w.value / c.value - 1:+7.1%} (vs cold)"
                f"{'':8s} {wsecs:8.2f} {w.iterations:8d} (cold {c.iterations})"
            )
            with torch.no_grad():
                for p, s0 in zip(model.parameters(), snapshot, strict=True):
                    p.copy_(s0)
        print(f"{'':12s} full-data reference: {fsecs:.1f} s (hessian, tol 1e-8)")


# ------------------------------------------------------------------- (e) edge of stability
def part_eos(eta: float, steps: int, every: int) -> None:
    print(
        f"\n(e) edge of stability: full-batch GD on mse_teacher (n = 2000), eta = {eta}, "
        f"2/eta = {2 / eta:.3f}; Hessian sharpness every {every} steps"
    )
    _, loss, X, Y = setup("mse_teacher")
    torch.manual_seed(0)  # the untrained student: GD sharpens it up to 2/eta
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    vec = None
    print(
        f"{'step':>5s} {'loss':>9s} {'full n':>8s} {'probe m=64':>10s} {'ratio':>6s} "
        f"{'dataset_sharpness':>17s}"
    )
    ratios, ds_err = [], []
    for step in range(steps + 1):
        if step % every == 0:
            full = dataset_sharpness(
                model,
                loss,
                (X, Y),
                kind="hessian",
                max_samples=None,
                tol=1e-6,
                max_iter=100,
                init_vector=vec,
            )
            vec = full.vector
            idx = torch.randperm(2000, generator=torch.Generator().manual_seed(step))[:64]
            probe = measure_curvature(model, X[idx], Y[idx], loss, sharpness="hessian")
            ds = dataset_sharpness(model, loss, (X, Y), kind="hessian", init_vector=vec)
            with torch.no_grad():
                lval = float(loss(model(X), Y))
            r = probe.hessian_sharpness / full.value
            if full.value > 0.9 * 2 / eta:
                ratios.append(r)
                ds_err.append(ds.value / full.value - 1)
            print(
                f"{step:5d} {lval:9.5f} {full.value:8.3f} {probe.hessian_sharpness:10.3f} "
                f"{r:6.2f} {ds.value:17.3f}"
            )
        opt.zero_grad()
        loss(model(X), Y).backward()
        opt.step()
    if ratios:
        print(
            f"at the edge (full sharpness > 0.9 x 2/eta, {len(ratios)} probes): probe/full "
            f"median {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]; "
            f"dataset_sharpness error max {max(abs(e) for e in ds_err):.1e}"
        )


# ------------------------------------------------------------------------ (t) timing
def part_timing() -> None:
    """exact_sigma on subsets of n against estimate_sigma and dataset_sharpness on all n."""
    from torch_coherence.curvature import estimate_sigma, exact_sigma

    print("\n(t) cost: exact_sigma on the first n digits vs estimates on all n = 1797")
    for name in ("mlp_ce", "cnn_ce"):
        model, loss, X, Y = setup(name)
        for n in (250, 500, 1000):
            t = time.perf_counter()
            exact_sigma(model, loss, (X[:n], Y[:n]))
            dt = time.perf_counter() - t
            print(f"{name} exact_sigma n={n}: {dt:.2f} s (load {os.getloadavg()[0]:.1f})")
        for m in (64, 256):
            t = time.perf_counter()
            estimate_sigma(model, loss, (X, Y), m=m)
            dt = time.perf_counter() - t
            print(f"{name} estimate_sigma n=1797 m={m}: {dt:.2f} s (load {os.getloadavg()[0]:.1f})")
        t = time.perf_counter()
        r = dataset_sharpness(model, loss, (X, Y))
        dt = time.perf_counter() - t
        print(
            f"{name} dataset_sharpness ggn n=1797: {dt:.2f} s, {r.iterations} products "
            f"(load {os.getloadavg()[0]:.1f})"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="sget")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tc_estimates_cache"))
    ap.add_argument("--setups", default=None, help="comma-separated subset")
    ap.add_argument("--eta", type=float, default=0.3)
    ap.add_argument("--eos-steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    pick = args.setups.split(",") if args.setups else None
    if "s" in args.parts:
        part_sharpness([s for s in SHARP_SETUPS if pick is None or s in pick], args.draws)
    if "g" in args.parts:
        part_sigma([s for s in SIGMA_SETUPS if pick is None or s in pick], args.draws, args.cache)
    if "e" in args.parts:
        part_eos(args.eta, args.eos_steps, 20)
    if "t" in args.parts:
        part_timing()
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
