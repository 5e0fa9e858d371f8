"""The curvature engine on the models people train: time in training steps, peak memory, peers.

Workloads (all on random data; CIFAR-sized images 3x32x32, no downloads):

* ``mlp``: 64-256-256-10 (85,002 parameters), m = 64.
* ``cnn``: 3x32x32 -> conv16 -> pool -> conv32 -> pool -> linear10 (25,578 parameters).
* ``resnet18-10`` / ``resnet18-100``: the CIFAR ResNet-18 (3x3 stem, no max-pool; 11.2M
  parameters), BatchNorm in eval mode as the engine probes it, C = 10 and 100.
* ``encoder``: a 4-layer ``nn.TransformerEncoder`` (width 256, 4 heads, feed-forward 1024,
  tokens 64 of a 1000-word vocabulary, learned positions as ``nn.Embedding``, mean-pooled,
  10 classes; 3.44M parameters).
* ``lm8000`` / ``lm32000``: a GPT-style causal LM (4 pre-LN blocks of width 256, 4 heads,
  sequence 128, tied input/output embedding, learned positions as ``nn.Embedding`` as in
  GPT-2), m = 16 sequences,
  cross-entropy on (m, T, V) logits: a sample is a sequence. ``-mc`` uses
  ``factors="mc"`` (4 sampled columns per sequence), ``-topk`` ``factors="topk"``.

For every workload: the engine (``measure_curvature``, GGN sharpness from K, no Hessian
Lanczos; median of 3 calls, one call where a call takes over 20 s) in seconds and in
training steps (SGD, batch 64 -- 64 sequences for the LM --
forward, backward and step, median of 3 after a warm-up), the peak resident memory above the
child's baseline (imports, model, data and a warm-up probe on 2 samples), and side by side
where they run: BackPACK ``SqrtGGNExact`` + ``K = sum V V^T`` (the GGN Gram), curvlinops
``GGNLinearOperator`` + ``eigsh`` (the GGN sharpness), ``torch.func`` ``vmap(grad)`` (the
per-sample gradient Gram, against the engine's gradient Gram from the same layer rules, with
its self-check's two backward passes and without them).

Each measurement runs in its own child interpreter, watched by the parent: above
``--mem-gib`` resident memory it is killed and reported "did not fit (> X GiB)", past
``--timeout`` seconds "did not finish (> N s)"; the script itself never crashes on a case.
Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child (tracemalloc does
not see torch's allocations).

Times are given twice: wall seconds, and CPU seconds of the child (``time.process_time``;
on one thread the time it actually had a core, so far less sensitive to other jobs on a
shared machine); "steps" is the engine over one training step in the same child, in each.

Growth: the CNN at m = 16 ... 128 and at channel widths x1, x2, x4, with exponents fitted by
least squares on log-log scales (time ~ m^a). Matmul peak: the best of three 2048 x 2048
matmuls in float64 and float32 on the same threads (CPU seconds); the engine's share of it
is the FLOPs that ``torch.profiler`` counts in its matmuls and convolutions divided by its
CPU time (the engine computes a float32 model's factor products in float32).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn(width: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16 * width, 32 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * width * 8 * 8, 10),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al. 2016, the 3x3-stem variant): 11.2M parameters at C = 10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def positions(T: int, d: int) -> nn.Embedding:
    """Learned positions as ``nn.Embedding(T, d)`` (GPT-2's ``wpe``, BERT's position
    embeddings), N(0, 0.02^2): the same numbers as ``torch.randn(T, d) * 0.02`` drawn here."""
    pos = nn.Embedding(T, d)
    with torch.no_grad():
        pos.weight.mul_(0.02)
    return pos


def arange_like(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device)


class Encoder(nn.Module):
    """Token classifier: embedding, 4 encoder layers of width 256, mean pool, 10 classes."""

    def __init__(self, vocab: int = 1000, d: int = 256, T: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = positions(T, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids) + self.pos(arange_like(ids))).mean(1))


class Block(nn.Module):
    """Pre-LN causal transformer block with ``nn.Linear`` projections."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(m, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(m, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-style LM: 4 blocks of width 256, sequence 128, tied input/output embedding."""

    def __init__(self, vocab: int, d: int = 256, layers: int = 4, T: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = positions(T, d)
        self.blocks = nn.Sequential(*[Block(d, 4) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's init (N(0, 1) saturates the softmax)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(arange_like(ids))
        return self.head(self.ln(self.blocks(h)))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A workload: model builder, probe size m, input maker, classes, engine options."""

    build: Callable[[], nn.Module]
    m: int
    inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    options: tuple[tuple[str, Any], ...] = ()
    peers: tuple[str, ...] = ()


def images(classes: int) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(
            0, classes, (n,), generator=gen
        )

    return make


def vectors(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def tokens_cls(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 1000, (n, 64), generator=gen), torch.randint(0, 10, (n,), generator=gen)


def tokens_lm(vocab: int) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (n, 129), generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    return make


MC = (("factors", "mc"), ("mc_samples", 4))
TOPK = (("factors", "topk"), ("factor_tol", 0.5))
CASES: dict[str, Case] = {
    "mlp": Case(mlp, 64, vectors, peers=("backpack", "curvlinops", "func")),
    "cnn": Case(cnn, 64, images(10), peers=("backpack", "curvlinops", "func")),
    "resnet18-10": Case(lambda: ResNet18(10), 64, images(10), peers=("func",)),
    "resnet18-100": Case(lambda: ResNet18(100), 64, images(100)),
    "encoder": Case(Encoder, 64, tokens_cls, peers=("func",)),
    "lm8000-mc": Case(lambda: GPT(8000), 16, tokens_lm(8000), MC),
    "lm8000-topk": Case(lambda: GPT(8000), 16, tokens_lm(8000), TOPK),
    "lm32000-mc": Case(lambda: GPT(32000), 16, tokens_lm(32000), MC),
}
for _w in (1, 2, 4):
    for _m in (16, 32, 64, 128):
        CASES[f"cnn-w{_w}-m{_m}"] = Case(lambda w=_w: cnn(w), _m, images(10))


# --------------------------------------------------------------------------- child side


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    return median_times(fn, repeats)[0]


def median_times(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (``time.process_time``:
    on one thread, the time the call had a core; far less sensitive to other jobs)."""
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if sum(times) > 20:  # a slow call (ResNet-18): fewer repeats
            break
    return statistics.median(times), statistics.median(cpus)


def train_step_seconds(case: Case, model: nn.Module, gen: torch.Generator) -> tuple[float, float]:
    x, y = case.inputs(64, gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    step()
    seconds = median_times(step, 3)
    model.eval()
    return seconds


def matmul_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of the matmuls / convolutions ``fn`` runs, as torch.profiler counts them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    return float(sum(e.flops for e in prof.key_averages() if e.flops))


def child_engine(case: Case, profile_flops: bool) -> dict[str, Any]:
    from torch_coherence.curvature import measure_curvature

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.build().eval()
    x, y = case.inputs(case.m, gen)
    loss = nn.CrossEntropyLoss()
    opts = dict(case.options)

    def probe(n: int) -> Any:
        return measure_curvature(model, x[:n], y[:n], loss, sharpness="ggn", seed=0, **opts)

    probe(2)
    base = rss_mib()
    reps = []
    seconds, cpu = median_times(lambda: reps.append(probe(case.m)), 3)  # 1 call over 20 s
    rep = reps[0]
    peak = peak_mib()
    res = {
        "seconds": seconds,
        "cpu": cpu,
        "above": peak - base,
        "base": base,
        "sigma": float(rep.stats.sigma),
        "ggn": float(rep.ggn_sharpness),
        "params": rep.num_params,
        "bound": rep.truncation_bound,
    }
    if profile_flops and seconds < 60:
        res["flops"] = matmul_flops(lambda: probe(case.m))
    res["step"], res["step_cpu"] = train_step_seconds(case, model, gen)
    return res


def grad_gram_engine(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, check: int = 2
) -> torch.Tensor:
    """The engine's per-sample gradient Gram: output gradients as the one cotangent row of the
    streamed layer-rule Gram (``measure_curvature`` does this in the same pass as K), with
    the self-check's ``check`` backward passes (2, as the engine runs by default)."""
    from torch_coherence.curvature.gram import gram_factors
    from torch_coherence.curvature.losses import output_gradients

    with torch.no_grad():
        out = model(x)
    cot = output_gradients(nn.CrossEntropyLoss(), out, y).unsqueeze(2)  # (m, C, 1)
    facs = gram_factors(model, x, cot, dict(model.named_parameters()), accumulate=True, check=check)
    return facs.full()[:, 0, :, 0]


def child_peer(case: Case, tool: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.build().eval()
    x, y = case.inputs(case.m, gen)
    if tool == "backpack":
        from bench_curvature import backpack_model, ggn_backpack, sigma_of_gram

        model = backpack_model(model)
        ggn_backpack(model, x[:2], y[:2])
        base = rss_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        K = ggn_backpack(model, x, y)
        return {
            "seconds": time.perf_counter() - t0,
            "cpu": time.process_time() - c0,
            "above": peak_mib() - base,
            "sigma": sigma_of_gram(K),
        }
    if tool == "curvlinops":
        import numpy as np
        from curvlinops import GGNLinearOperator
        from scipy.sparse.linalg import eigsh

        params = [p for p in model.parameters() if p.requires_grad]

        def top() -> float:
            G = GGNLinearOperator(
                model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False
            ).to_scipy()
            v0 = np.random.default_rng(0).standard_normal(G.shape[0]).astype(G.dtype)
            return float(eigsh(G, k=1, which="LA", tol=1e-4, v0=v0, return_eigenvectors=False)[0])

        base = rss_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        value = top()
        return {
            "seconds": time.perf_counter() - t0,
            "cpu": time.process_time() - c0,
            "above": peak_mib() - base,
            "ggn": value,
        }
    if tool in ("func", "engine-grad", "engine-grad-nocheck"):
        from bench_curvature import grad_gram_func

        if tool == "func":
            fn = grad_gram_func
        else:
            check = 0 if tool.endswith("nocheck") else 2

            def fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return grad_gram_engine(model, x, y, check)

        fn(model, x[:2], y[:2])
        base = rss_mib()
        seconds, cpu = median_times(lambda: fn(model, x, y), 5)
        return {"seconds": seconds, "cpu": cpu, "above": peak_mib() - base}
    raise ValueError(f"unknown tool {tool}")


def trained_small_lm(steps: int = 300) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """GPT(V = 40, width 32, 2 blocks, T = 8) fitted to 'next token = token + 1 (mod V)' with
    10% random tokens, so that its predictions are peaked as a trained LM's are."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    V, T = 40, 8
    model = GPT(V, d=32, layers=2, T=T)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, V, (n, 1), generator=gen)
        seq = (start + torch.arange(T + 1)) % V
        noise = torch.rand(n, T + 1, generator=gen) < 0.1
        seq = torch.where(noise, torch.randint(0, V, (n, T + 1), generator=gen), seq)
        return seq[:, :-1], seq[:, 1:]

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = batch(32)
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
        opt.step()
    x, y = batch(6)
    return model.eval(), x, y


def child_accuracy() -> dict[str, Any]:
    """sigma of the exact, top-k and sampled sequence factors on the small trained LM."""
    from torch_coherence.curvature import measure_curvature

    model, x, y = trained_small_lm()
    loss = nn.CrossEntropyLoss()
    out = {}
    variants = [("exact", {})]
    variants += [
        (f"topk tol={t:g}", {"factors": "topk", "factor_tol": t}) for t in (0.01, 0.1, 0.5)
    ]
    variants += [(f"mc S={k}", {"factors": "mc", "mc_samples": k}) for k in (1, 4, 16)]
    for label, kw in variants:
        t0 = time.perf_counter()
        rep = measure_curvature(model, x, y, loss, sharpness="ggn", seed=0, **kw)
        out[label] = {
            "seconds": time.perf_counter() - t0,
            "sigma": rep.stats.sigma,
            "ggn": rep.ggn_sharpness,
            "maxh": rep.stats.max_sample_sharpness,
            "bound": rep.truncation_bound,
        }
    return out


def accuracy_table(args: argparse.Namespace) -> None:
    r = run_child("mlp", "accuracy", args)
    if "error" in r:
        print(f"\nFactor accuracy: {r['error']}")
        return
    ex = r["exact"]
    rows = []
    for label, v in r.items():
        rows.append(
            [
                label,
                fmt(v["sigma"], ".4g"),
                f"{(v['sigma'] / ex['sigma'] - 1) * 100:+.1f}%",
                f"{(v['maxh'] / ex['maxh'] - 1) * 100:+.1f}%",
                f"{(v['ggn'] / ex['ggn'] - 1) * 100:+.1f}%",
                fmt(v["bound"], ".2g"),
                fmt(v["seconds"]),
            ]
        )
    table(
        "Factor accuracy: trained GPT (V = 40, T = 8, width 32, 2 blocks), m = 6 sequences",
        [
            "factors",
            "sigma",
            "sigma err",
            "max_i lambda_1(H_i) err",
            "GGN sharpness err",
            "trunc. bound",
            "s",
        ],
        rows,
    )


def child_main(name: str, tool: str, profile_flops: bool) -> None:
    if tool == "accuracy":
        print(json.dumps(child_accuracy()))
        return
    case = CASES[name]
    res = child_engine(case, profile_flops) if tool == "engine" else child_peer(case, tool)
    print(json.dumps(res))


# --------------------------------------------------------------------------- parent side


def run_child(name: str, tool: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a watched child: its JSON, or why it has none."""
    import psutil

    cmd = [sys.executable, __file__, "--child", name, tool, "--threads", str(args.threads)]
    if args.flops:
        cmd.append("--flops")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watch = psutil.Process(proc.pid)
    limit = args.mem_gib * 2**30
    t0 = time.perf_counter()
    verdict = None
    while proc.poll() is None:
        try:
            rss = watch.memory_info().rss
        except psutil.NoSuchProcess:
            break
        if rss > limit:
            verdict = f"did not fit (> {args.mem_gib:g} GiB)"
        elif time.perf_counter() - t0 > args.timeout:
            verdict = f"did not finish (> {args.timeout:g} s)"
        if verdict:
            proc.kill()
            proc.wait()
            return {"error": verdict}
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": ("failed: " + last)[:120]}
    return json.loads(out.strip().splitlines()[-1])


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of the best of three n x n matmuls."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(median_times(lambda: a @ b, 1)[1] for _ in range(3))  # CPU seconds
    return 2 * n**3 / best / 1e9


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den if den else math.nan


def main_tables(args: argparse.Namespace) -> None:
    peak64, peak32 = matmul_peak(torch.float64), matmul_peak(torch.float32)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()}")
    print(f"matmul peak: float64 {peak64:.1f} GFLOP/s, float32 {peak32:.1f} GFLOP/s")
    names = (
        args.cases.split(",")
        if args.cases
        else (
            ["mlp", "cnn", "lm8000-mc"]
            if args.quick
            else [
                "mlp",
                "cnn",
                "resnet18-10",
                "resnet18-100",
                "encoder",
                "lm8000-mc",
                "lm8000-topk",
                "lm32000-mc",
            ]
        )
    )
    rows, peers = [], []
    for name in names:
        case = CASES[name]
        r = run_child(name, "engine", args)
        if "error" in r:
            rows.append([name, str(case.m), "-", r["error"], *["-"] * 9])
        else:
            flops = r["flops"] / r["cpu"] / 1e9 if "flops" in r else None
            frac = None if flops is None else f"{flops / peak64:.2f} / {flops / peak32:.2f}"
            rows.append(
                [
                    name,
                    str(case.m),
                    f"{r['params'] / 1e6:.3g}M",
                    fmt(r["seconds"]),
                    fmt(r["step"]),
                    fmt(r["seconds"] / r["step"]),
                    fmt(r["cpu"]),
                    fmt(r["step_cpu"]),
                    fmt(r["cpu"] / r["step_cpu"]),
                    f"{r['above']:.0f}",
                    fmt(r["sigma"], ".4g"),
                    fmt(r["ggn"], ".4g"),
                    fmt(r["bound"], ".2g"),
                    frac or "-",
                ]
            )
        grad_tools = ("engine-grad", "engine-grad-nocheck") if "func" in case.peers else ()
        for tool in case.peers + grad_tools:
            p = run_child(name, tool, args)
            peers.append(
                [name, tool]
                + (
                    [p["error"], "-", "-", "-"]
                    if "error" in p
                    else [
                        fmt(p["seconds"]),
                        fmt(p.get("cpu")),
                        f"{p['above']:.0f}",
                        fmt(p.get("sigma", p.get("ggn")), ".4g"),
                    ]
                )
            )
        print(f"  done {name} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    table(
        "Engine (measure_curvature, sharpness='ggn') per workload",
        [
            "case",
            "m",
            "params",
            "engine s",
            "train step s",
            "steps",
            "engine CPU s",
            "step CPU s",
            "steps (CPU)",
            "peak above base MiB",
            "sigma",
            "GGN sharpness",
            "trunc. bound",
            "peak frac. f64 / f32",
        ],
        rows,
    )
    table(
        "Peers (GGN Gram: backpack; GGN sharpness: curvlinops; gradient Gram: func, engine-grad)",
        ["case", "tool", "s", "CPU s", "peak above base MiB", "sigma / ggn"],
        peers,
    )
    if not args.no_accuracy:
        accuracy_table(args)
    growth(args)
    print(f"\nload after: {os.getloadavg()}")


def growth(args: argparse.Namespace) -> None:
    ms = [16, 32, 64] if args.quick else [16, 32, 64, 128]
    widths = [1, 2] if args.quick else [1, 2, 4]
    rows, series = [], {}
    for w in widths:
        for m in ms if w == 1 else [64]:
            r = run_child(f"cnn-w{w}-m{m}", "engine", args)
            if "error" in r:
                rows.append([str(w), str(m), "-", r["error"], "-", "-"])
                continue
            series[(w, m)] = (r["params"], r["cpu"], max(r["above"], 1.0))
            rows.append(
                [
                    str(w),
                    str(m),
                    str(r["params"]),
                    fmt(r["seconds"]),
                    fmt(r["cpu"]),
                    f"{r['above']:.0f}",
                ]
            )
    table(
        "Growth: CNN engine over m (width x1) and width (m = 64); exponents from CPU seconds",
        ["width", "m", "params", "s", "CPU s", "peak above base MiB"],
        rows,
    )
    by_m = [(m, *series[(1, m)][1:]) for m in ms if (1, m) in series]
    by_w = [series[(w, 64)] for w in widths if (w, 64) in series]
    if len(by_m) > 1:
        print(
            f"\ntime ~ m^{slope([a for a, _, _ in by_m], [b for _, b, _ in by_m]):.2f}, "
            f"memory ~ m^{slope([a for a, _, _ in by_m], [c for _, _, c in by_m]):.2f}"
        )
    if len(by_w) > 1:
        print(
            f"time ~ params^{slope([a for a, _, _ in by_w], [b for _, b, _ in by_w]):.2f}, "
            f"memory ~ params^{slope([a for a, _, _ in by_w], [c for _, _, c in by_w]):.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="mlp, cnn, lm8000-mc; a short growth table"
    )
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    ap.add_argument("--mem-gib", type=float, default=8.0, help="resident memory per child")
    ap.add_argument("--flops", action="store_true", help="profile matmul FLOPs of the engine")
    ap.add_argument("--no-growth", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the factor-accuracy table")
    ap.add_argument("--accuracy-only", action="store_true", help="only the factor-accuracy table")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "TOOL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child_main(args.child[0], args.child[1], args.flops)
        return
    if args.accuracy_only:
        accuracy_table(args)
        return
    if args.no_growth:
        globals()["growth"] = lambda _args: None
    main_tables(args)


if __name__ == "__main__":
    main()
