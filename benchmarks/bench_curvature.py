"""Curvature engine against BackPACK, torch.func, PyHessian and curvlinops, in one run.

Workloads:

* digits MLP 64-256-256-10 (85,002 parameters), cross-entropy, lightly trained (3 epochs of
  SGD, lr 0.1, batch 32 on scikit-learn's bundled digits), probe of m = 256 digits;
* small CNN 3x32x32 -> conv16 -> pool -> conv32 -> pool -> linear10 (25,578 parameters),
  random data and labels, m = 256.

Parts:

(a) GGN block Gram K (C = 10, m = 256, MLP): ``measure_curvature(..., sharpness=None)``
    against BackPACK ``SqrtGGNExact`` + the matmul ``K = sum_p V_p V_p^T``.
(b) per-sample gradient Gram (m = 256, MLP): BackPACK ``BatchGrad``, ``torch.func``
    ``vmap(grad)``, a ghost Gram written here (Goodfellow 2015: for a linear layer the
    per-sample gradient is ``delta_i a_i^T``, so ``<g_i, g_j> = (delta_i . delta_j)(a_i . a_j)``)
    and torch-coherence.
(c) top Hessian eigenvalue (MLP and CNN): PyHessian (power iteration, its defaults),
    curvlinops ``HessianLinearOperator`` + ``scipy.sparse.linalg.eigsh``, torch-coherence
    ``hessian_sharpness`` cold and warm-started after one SGD step. The reference is Lanczos
    in float64 run to a relative residual of 1e-10, cross-checked against eigsh in float64.
(d) m = 4096 probe of the MLP (digits resampled with small noise), default settings.

Every timed tool runs in its own child process, so its peak resident memory
(``ru_maxrss``) is its own; the table gives the peak and the peak above the child's baseline
after imports and setup. Times: one untimed warm-up call on a small batch, then the median
of ``--repeats`` calls (one call for the slow BackPACK GGN).

Run:  python benchmarks/bench_curvature.py [--parts abcd] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

NUM_CLASSES = 10
PROBE = 256
BIG_PROBE = 4096


# --------------------------------------------------------------------------- workloads


def digits_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def build_workloads(path: Path) -> None:
    """Train the MLP lightly, draw the CNN and the data; save everything to ``path``."""
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    mlp = digits_mlp()
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    for _ in range(3):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(mlp(x[idx]), y[idx]).backward()
            opt.step()
    probe = torch.randperm(len(x))[:PROBE]
    big = torch.randint(0, len(x), (BIG_PROBE,))
    cnn = small_cnn()
    torch.save(
        {
            "mlp": mlp.state_dict(),
            "cnn": cnn.state_dict(),
            "mlp_x": x[probe],
            "mlp_y": y[probe],
            "mlp_step_x": x[:32],
            "mlp_step_y": y[:32],
            "big_x": x[big] + 0.05 * torch.randn(BIG_PROBE, 64),
            "big_y": y[big],
            "cnn_x": torch.randn(PROBE, 3, 32, 32),
            "cnn_y": torch.randint(0, NUM_CLASSES, (PROBE,)),
        },
        path,
    )


def load(path: Path, which: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    data = torch.load(path)
    model = digits_mlp() if which == "mlp" else small_cnn()
    model.load_state_dict(data[which])
    model.eval()
    return model, data


# --------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn`` and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def per_sample_layout(K: torch.Tensor, m: int) -> torch.Tensor:
    """(C m, C m) Gram with rows ordered (class, sample) -> (m, C, m, C)."""
    return K.reshape(NUM_CLASSES, m, NUM_CLASSES, m).permute(1, 0, 3, 2).contiguous()


def sigma_of_gram(K: torch.Tensor) -> float:
    """sigma = lambda_1(S) / max_i lambda_1(K_ii), S_ij = ||K_ij||_F (docs/theory.md §3), directly.

    Written out here rather than taken from the library: an independent check of the engine's
    sigma, and tolerant of the float32 rounding in BackPACK's factors.
    """
    K = K.double()
    S = K.square().sum(dim=(1, 3)).sqrt()
    blocks = torch.diagonal(K, dim1=0, dim2=2).permute(2, 0, 1)  # (m, C, C)
    top = torch.linalg.eigvalsh(0.5 * (blocks + blocks.mT))[:, -1].max()
    return float(torch.linalg.eigvalsh(S)[-1] / top)


# --------------------------------------------------------------------------- (a) GGN Gram


def backpack_model(model: nn.Module) -> nn.Module:
    """The model and the loss wrapped by BackPACK's ``extend``."""
    from backpack import extend

    BACKPACK_LOSS.append(extend(nn.CrossEntropyLoss()))
    return extend(model)


BACKPACK_LOSS: list[nn.Module] = []


def backpack_gram(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, extension: Any, attr: str, rows: int
) -> torch.Tensor:
    """One BackPACK backward with ``extension``, then ``sum_p V_p V_p^T`` of its output."""
    from backpack import backpack

    model.zero_grad()
    loss = BACKPACK_LOSS[-1](model(x), y)
    with backpack(extension):
        loss.backward()
    K = torch.zeros(rows, rows)
    for p in model.parameters():
        V = getattr(p, attr).reshape(rows, -1)
        K.addmm_(V, V.T)
        delattr(p, attr)
    return K


def ggn_backpack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BackPACK's exact GGN square root (C, m, *shape) per parameter, then the Gram."""
    from backpack.extensions import SqrtGGNExact

    m = x.shape[0]
    K = backpack_gram(model, x, y, SqrtGGNExact(), "sqrt_ggn_exact", NUM_CLASSES * m)
    # the mean-reduced loss scales every factor by 1/sqrt(m); per-sample factors do not
    return per_sample_layout(K * m, m)


def child_ggn(tool: str, path: Path, repeats: int) -> dict[str, Any]:
    model, data = load(path, "mlp")
    x, y = data["mlp_x"], data["mlp_y"]
    if tool == "backpack":
        model = backpack_model(model)
        ggn_backpack(model, x[:8], y[:8])
        base = peak_rss_mb()
        seconds, K = timed(lambda: ggn_backpack(model, x, y), 1)
        peak = peak_rss_mb()
        return {"seconds": seconds, "base": base, "peak": peak, "sigma": sigma_of_gram(K)}
    from torch_coherence.curvature import measure_curvature

    loss = nn.CrossEntropyLoss()
    measure_curvature(model, x[:8], y[:8], loss, sharpness=None)
    base = peak_rss_mb()
    seconds, rep = timed(lambda: measure_curvature(model, x, y, loss, sharpness=None), repeats)
    peak = peak_rss_mb()
    return {"seconds": seconds, "base": base, "peak": peak, "sigma": float(rep.stats.sigma)}


# --------------------------------------------------------------------------- (b) gradient Gram


def grad_gram_backpack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from backpack.extensions import BatchGrad

    m = x.shape[0]
    # the mean-reduced loss scales every per-sample gradient by 1/m
    return backpack_gram(model, x, y, BatchGrad(), "grad_batch", m) * m**2


def grad_gram_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    m = x.shape[0]
    G = torch.zeros(m, m)
    for g in grads.values():
        g = g.reshape(m, -1)
        G.addmm_(g, g.T)
    return G


def grad_gram_ghost(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ghost Gram for an all-Linear network: one backward, no per-sample gradients.

    With a_i the layer input and delta_i = dl_i/dz_i the gradient of sample i's loss at the
    layer output, <grad_W l_i, grad_W l_j> = (delta_i . delta_j)(a_i . a_j) and the bias adds
    delta_i . delta_j (Goodfellow 2015, "Efficient per-example gradient computations").
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        out.retain_grad()
        outputs.append(out)

    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    handles = [mod.register_forward_hook(hook) for mod in linears]
    try:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")  # delta per sample
        torch.autograd.backward(loss, inputs=outputs)
    finally:
        for h in handles:
            h.remove()
    G = torch.zeros(x.shape[0], x.shape[0])
    for mod, a, z in zip(linears, inputs, outputs, strict=True):
        dd = z.grad @ z.grad.T
        G += dd * (a @ a.T) + (dd if mod.bias is not None else 0.0)
    return G


def grad_gram_coherence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The engine's own path: per-sample output gradients as the one cotangent row of the
    layer-rule Gram (internal functions; ``measure_curvature`` does this in the same pass)."""
    from torch_coherence.curvature.gram import gram_factors
    from torch_coherence.curvature.losses import output_gradients

    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        out = model(x)
    cot = output_gradients(loss, out, y).unsqueeze(2)  # (m, C, 1)
    facs = gram_factors(model, x, cot, dict(model.named_parameters()))
    return facs.full()[:, 0, :, 0]


GRAD_GRAMS: dict[str, Callable[..., torch.Tensor]] = {
    "backpack": grad_gram_backpack,
    "torch.func": grad_gram_func,
    "ghost": grad_gram_ghost,
    "torch-coherence": grad_gram_coherence,
}


def child_grad_gram(tool: str, path: Path, repeats: int) -> dict[str, Any]:
    model, data = load(path, "mlp")
    x, y = data["mlp_x"], data["mlp_y"]
    if tool == "backpack":
        model = backpack_model(model)
    fn = GRAD_GRAMS[tool]
    fn(model, x[:8], y[:8])
    base = peak_rss_mb()
    seconds, G = timed(lambda: fn(model, x, y), max(repeats, 5))
    peak = peak_rss_mb()
    ref = grad_gram_func(load(path, "mlp")[0], x, y)  # a model BackPACK has not extended
    err = float((G - ref).abs().max() / ref.abs().max())
    return {"seconds": seconds, "base": base, "peak": peak, "rel_diff": err}


# --------------------------------------------------------------------------- (c) eigenvalue


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p.sub_(lr * g)


def reference_top(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cross_check: bool = True
) -> tuple[float, float]:
    """Float64 Lanczos to residual 1e-10, and float64 eigsh (tol 1e-10) as a cross-check."""
    from torch_coherence.curvature.sharpness import hessian_sharpness

    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    params = list(m64.parameters())
    res = hessian_sharpness(
        lambda: nn.functional.cross_entropy(m64(x64), y),
        params,
        tol=1e-10,
        max_hvps=300,
        stop="residual",
    )
    if not cross_check:
        return res.value, math.nan
    eigsh_value, _ = eig_curvlinops(m64, x64, y, tol=1e-10)
    return res.value, eigsh_value


def eig_pyhessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the package rebinds the name
    count = [0]
    original = ph.hessian_vector_product

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counting
    try:
        torch.manual_seed(0)
        h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        values, _ = h.eigenvalues(top_n=1)  # defaults: maxIter=100, tol=1e-3
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)
    return float(values[0]), count[0]


def eig_curvlinops(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float = 1e-4
) -> tuple[float, int]:
    import numpy as np
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False
    ).to_scipy()
    count = [0]

    def mv(v: np.ndarray) -> np.ndarray:
        count[0] += 1 if v.ndim == 1 else v.shape[1]
        return H @ v

    op = LinearOperator(H.shape, matvec=mv, dtype=H.dtype)
    rng = np.random.default_rng(0)
    v0 = rng.standard_normal(H.shape[0]).astype(H.dtype)
    values = eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return float(values[0]), count[0]


def eig_coherence(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, init: torch.Tensor | None = None
) -> Any:
    from torch_coherence.curvature.sharpness import hessian_sharpness

    return hessian_sharpness(
        lambda: nn.functional.cross_entropy(model(x), y),
        list(model.parameters()),
        tol=1e-4,
        max_hvps=20,
        init_vector=init,
    )


def run_eigen(path: Path, which: str) -> list[dict[str, Any]]:
    model, data = load(path, which)
    x, y = data[f"{which}_x"], data[f"{which}_y"]
    # the float64 eigsh cross-check of the reference costs minutes on the CNN: MLP only
    ref, ref_eigsh = reference_top(model, x, y, cross_check=which == "mlp")
    note = f"eigsh f64 {ref_eigsh:.10g}" if which == "mlp" else ""
    rows: list[dict[str, Any]] = [{"tool": "reference (Lanczos f64)", "value": ref, "note": note}]

    def row(tool: str, fn: Callable[[], tuple[float, int]], reference: float) -> None:
        try:
            t0 = time.perf_counter()
            value, hvps = fn()
            seconds = time.perf_counter() - t0
        except Exception as exc:  # a peer tool failing on this torch is a result too
            rows.append({"tool": tool, "error": f"{type(exc).__name__}: {exc}"[:120]})
            return
        rel = abs(value - reference) / abs(reference)
        rows.append(
            {"tool": tool, "value": value, "hvps": hvps, "rel_err": rel, "seconds": seconds}
        )

    row("PyHessian (power, tol 1e-3)", lambda: eig_pyhessian(model, x, y), ref)
    row("curvlinops + eigsh (tol 1e-4)", lambda: eig_curvlinops(model, x, y), ref)
    first: list[Any] = []

    def cold_run() -> tuple[float, int]:
        first.append(eig_coherence(model, x, y))
        return first[0].value, first[0].hvp_count

    row("torch-coherence cold", cold_run, ref)
    if not first:
        return rows
    # one SGD step later (a batch of 32), cold and warm-started from the old top vector;
    # the MLP was trained at lr 0.1 and sits at the edge of stability (lambda_1 ~ 2 / 0.1)
    lrs = (0.1, 0.01) if which == "mlp" else (0.01, 0.001)
    step_x, step_y = (data["mlp_step_x"], data["mlp_step_y"]) if which == "mlp" else (x, y)
    for lr in lrs:
        moved = copy.deepcopy(model)
        sgd_step(moved, step_x[:32], step_y[:32], lr=lr)
        ref2, _ = reference_top(moved, x, y, cross_check=False)
        rows.append({"tool": f"reference after 1 SGD step, lr {lr}", "value": ref2})
        for start, init in (("cold", None), ("warm", first[0].vector)):
            row(
                f"  torch-coherence {start}",
                lambda m=moved, v=init: (lambda r: (r.value, r.hvp_count))(
                    eig_coherence(m, x, y, v)
                ),
                ref2,
            )
    return rows


# --------------------------------------------------------------------------- (d) m = 4096


def child_big(tool: str, path: Path, repeats: int) -> dict[str, Any]:
    from torch_coherence.curvature import measure_curvature

    model, data = load(path, "mlp")
    x, y = data["big_x"], data["big_y"]
    loss = nn.CrossEntropyLoss()
    sharpness = None if tool == "ggn-only" else "both"
    measure_curvature(model, x[:16], y[:16], loss, sharpness=sharpness)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    rep = measure_curvature(model, x, y, loss, sharpness=sharpness)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "base": base,
        "peak": peak_rss_mb(),
        "sigma": float(rep.stats.sigma),
        "hvps": getattr(rep, "hvp_count", None),
    }


# --------------------------------------------------------------------------- driver

CHILDREN = {"ggn": child_ggn, "grad": child_grad_gram, "big": child_big}


def in_child(part: str, tool: str, path: Path, repeats: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return its JSON result or the error."""
    cmd = [sys.executable, __file__, "--child", part, tool, str(path), "--repeats", str(repeats)]
    cmd += ["--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:150]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def memory_cells(res: dict[str, Any]) -> list[str]:
    if "peak" not in res:
        return ["-", "-"]
    return [f"{res['peak']:.0f}", f"{res['peak'] - res['base']:.0f}"]


def part_a(path: Path, repeats: int) -> None:
    res = {tool: in_child("ggn", tool, path, repeats) for tool in ("backpack", "torch-coherence")}
    bp, tc = res["backpack"], res["torch-coherence"]
    rows = []
    for tool, r in res.items():
        speed = mem = "-"
        if "seconds" in r and "seconds" in bp:
            speed = f"{bp['seconds'] / r['seconds']:.1f}x"
            mem = f"{(bp['peak'] - bp['base']) / max(r['peak'] - r['base'], 1.0):.1f}x"
        rows.append(
            [
                tool,
                fmt(r.get("seconds"), ".3f"),
                *memory_cells(r),
                speed,
                mem,
                fmt(r.get("sigma"), ".6g"),
                r.get("error", ""),
            ]
        )
    print_table(
        f"(a) GGN block Gram, digits MLP (85k params), m = {PROBE}, C = {NUM_CLASSES}",
        ["tool", "seconds", "peak RSS MB", "above base MB", "speed-up", "memory", "sigma", "error"],
        rows,
    )
    if "seconds" in bp and "seconds" in tc:
        print(
            f"target: >= 20x faster ({bp['seconds'] / tc['seconds']:.1f}x) and >= 10x less "
            f"memory above baseline "
            f"({(bp['peak'] - bp['base']) / max(tc['peak'] - tc['base'], 1.0):.1f}x); "
            f"sigma agrees to {abs(bp['sigma'] - tc['sigma']) / bp['sigma']:.1e}"
        )


def part_b(path: Path, repeats: int) -> None:
    res = {tool: in_child("grad", tool, path, repeats) for tool in GRAD_GRAMS}
    ghost = res["ghost"].get("seconds")
    rows = [
        [
            tool,
            fmt(1e3 * r["seconds"], ".2f") if "seconds" in r else "-",
            *memory_cells(r),
            f"{r['seconds'] / ghost:.2f}" if ghost and "seconds" in r else "-",
            fmt(r.get("rel_diff"), ".1e"),
            r.get("error", ""),
        ]
        for tool, r in res.items()
    ]
    print_table(
        f"(b) per-sample gradient Gram, digits MLP, m = {PROBE}",
        ["tool", "ms", "peak RSS MB", "above base MB", "time / ghost", "max diff vs func", "error"],
        rows,
    )
    print("target: torch-coherence within 2x of the ghost Gram")


def part_c(path: Path, repeats: int) -> None:
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    for which, label in (("mlp", "digits MLP (85k params)"), ("cnn", "CNN (25.6k params)")):
        rows = []
        for r in run_eigen(path, which):
            rows.append(
                [
                    r["tool"],
                    fmt(r.get("value"), ".8g"),
                    str(r.get("hvps", "-")),
                    fmt(r.get("rel_err"), ".1e"),
                    fmt(r.get("seconds"), ".3f"),
                    r.get("error", r.get("note", "")),
                ]
            )
        print_table(
            f"(c) top Hessian eigenvalue, {label}, m = {PROBE}",
            ["method", "lambda_1", "HVPs", "rel. error", "seconds", "note"],
            rows,
        )
    print("target: 1e-4 relative in <= 20 HVPs cold, <= 8 warm")


def part_d(path: Path, repeats: int) -> None:
    rows = []
    for tool in ("default (sharpness='both')", "ggn-only"):
        r = in_child("big", tool, path, repeats)
        rows.append(
            [
                tool,
                fmt(r.get("seconds"), ".2f"),
                *memory_cells(r),
                fmt(r.get("sigma"), ".5g"),
                str(r.get("hvps", "-")),
                r.get("error", ""),
            ]
        )
    print_table(
        f"(d) probe of m = {BIG_PROBE}, digits MLP, measure_curvature",
        ["settings", "seconds", "peak RSS MB", "above base MB", "sigma", "HVPs", "error"],
        rows,
    )
    print("target: under 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ac'")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per tool")
    parser.add_argument(
        "--child", nargs=3, metavar=("PART", "TOOL", "DATA"), help=argparse.SUPPRESS
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        part, tool, data = args.child
        print(json.dumps(CHILDREN[part](tool, Path(data), args.repeats)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workloads.pt"
        build_workloads(path)
        for part, fn in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
            if part in args.parts:
                fn(path, args.repeats)


if __name__ == "__main__":
    main()
