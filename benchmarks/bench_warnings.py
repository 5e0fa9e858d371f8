"""Blow-up grid: which criterion, evaluated before the first step, predicts real blow-ups?

Three setups, each resumed from a checkpoint of 300 SGD steps (B = 32):

* ``mlp``: scikit-learn's bundled digits (n = 1797, no download), MLP 64-64-64-10 (tanh),
  cross-entropy, plain SGD;
* ``cnn``: the same digits as 1x8x8 images, conv8-pool-conv16-linear (ReLU), cross-entropy,
  SGD with heavy-ball momentum 0.9 (the momentum buffers are part of the checkpoint);
* ``mse``: a synthetic teacher (n = 1024, 8 inputs, a random 8-16-1 tanh network plus noise
  of s.d. 0.1), student MLP 8-64-64-1 (tanh), mean squared error, plain SGD.

For each setup and batch size B in {8, 32, 128} the script first finds the empirical
blow-up lr ``lr*`` by bisection on real runs (3 calibration seeds, blown up when at least
2 of 3 blow up; 4 bisection steps in log2 after bracketing from 2(1 + beta)/lambda_1 of the
full training loss), then runs the grid: lr in {0.25, 0.5, 0.8, 1.25, 2, 4} x lr*, 5
seeds, 300 steps each from the checkpoint. A run **blows up** at step t when its mini-batch
loss at w_t is non-finite or the mean of the last ceil(32 / B) mini-batch losses exceeds 10x
the full training loss at the checkpoint (the window keeps B = 8 batch noise from counting).

Every criterion is evaluated at a pre-flight probe at step 0, at the checkpoint weights:

* ``T1 probe``: Theorem 1 margin > 1 (``stability_report``) with the Hessian sharpness and
  ``sigma_full`` of ``measure_curvature`` on a 64-example probe;
* ``T1 full``: the same with the Hessian sharpness of the whole training loss;
* ``rho(T) > 1`` (``mean_square_rate`` on the probe's Gram, ``tol=1e-4``) and ``gamma > 0``
  (``lyapunov_exponent``, 300 steps x 8 repeats): only on the ``mse`` setup (Gram 64 x 64)
  and seed 0 by default (``--linear-setups``, ``--linear-seeds``): on the cross-entropy
  setups the Gram is 640 x 640 and one rho(T) took over 150 s at load 11;
* ``BS >= 2(1+beta)/lr``: batch sharpness over 10 mini-batches of size B;
* ``LA k, c x``: the empirical lookahead with k steps (k in 5, 10, 20) at multiples
  (1, 2, 4): warns when the short run at c x lr blew up (``blowup_lr <= c lr``). The
  lookahead's batches come from the probe's own generator (seeded per run, never the real
  run's sampler); ``LA 10, 1x (real batches)`` uses the real run's first 10 batches instead,
  to show whether the prediction depends on seeing them.

Per setup and criterion: recall (blow-ups preceded by a warning), false alarms (warnings in
runs that never blew up), lead time (blow-up step of the warned runs: the probe is at step
0), and cost in training steps (criterion wall time / one training step of that setup and B).
Then how close the lookahead's ``blowup_lr`` (k = 20, ``refine=4``) came to ``lr*``.

Modes: ``--lookahead-only`` scores only lookaheads at the current lr, at blow-up thresholds
3, 5 and 10x (from ``LookaheadResult.peak_loss``) and with two independent draws;
``--only-blowup-lr`` measures only the lookahead's ``blowup_lr`` against ``lr*``;
``--seed-offset 5`` gives a held-out grid. ``--draws`` records, per grid run, four
independent k = 10 and two k = 20 short runs at the current lr on the batches the probe's own
generator gives (``probe_generator``), the probe's bracket (k = 10, multiples 1, 2, 4,
``refine=4``, every refine r <= 4 replayed from ``LookaheadResult.tested``) and the real
run; ``--score FILES --score-seeds a-b`` scores the rules of ``RULES`` and the bracket on
those seeds only (choose on some seeds, validate on others); ``--trajectories`` keeps every
short run's step losses to score smoother blow-up tests. ``--e2e`` trains every grid run
through ``CoherenceMonitor`` with its defaults (``start`` before the first step, ``step``
with the loss after each one), counts ``BlowupWarning`` before the blow-up, scores the
logged ``stability/blowup_lr`` and repeats the runs at 0.5x and 1.25x ``lr*`` without the
monitor to check bit-identity; ``--e2e-estimates probe`` passes ``estimates="probe"`` to the
monitor (the data-set estimates do not enter the blow-up prediction and would make the grid
take over an hour). ``--lr-star FILE`` caches ``lr*``. The measured tables are in
``docs/warnings.md``.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_warnings.py [--quick] [--seeds 5]
          [--seed-offset 0] [--setups mlp,cnn,mse] [--batch-sizes 8,32,128]
          [--lookahead-only | --only-blowup-lr | --draws [--trajectories]
           | --e2e [--e2e-estimates probe]]
          [--lr-star lr_star.json] [--json runs.json]
      python benchmarks/bench_warnings.py --score runs.json[,more.json] --score-seeds 0-9
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import torch_coherence as tc
from torch_coherence.curvature.sharpness import hessian_sharpness
from torch_coherence.lookahead import DEFAULT_STEPS, draw_batches, lookahead

LR_FACTORS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)
BATCH_SIZES = (8, 32, 128)
STEPS = 300
BLOWUP = 10.0
LA_STEPS = (5, 10, 20)
LA_MULTIPLES = (1.0, 2.0, 4.0)
PROBE = 64
REFINE = 4  # extra short runs of the k = 20 lookahead that sharpen blowup_lr


# --------------------------------------------------------------------------- setups


@dataclass
class Setup:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    make: Callable[[], nn.Module]
    loss: nn.Module
    momentum: float
    ckpt_lr: float
    state: dict = field(default_factory=dict)
    opt_state: dict = field(default_factory=dict)
    loss0: float = math.nan

    @property
    def n(self) -> int:
        return len(self.x)

    def fresh(self, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.make()
        model.load_state_dict(self.state)
        opt = torch.optim.SGD(model.parameters(), lr=self.ckpt_lr, momentum=self.momentum)
        if self.opt_state:
            opt.load_state_dict(_clone(self.opt_state))
        for g in opt.param_groups:
            g["lr"] = lr
        return model, opt


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def _student() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def _teacher_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(1024, 8, generator=g)
    w1 = torch.randn(8, 16, generator=g) / math.sqrt(8)
    w2 = torch.randn(16, 1, generator=g) / math.sqrt(16) * 2
    y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(1024, 1, generator=g)
    return x, y


def build_setups(names: list[str]) -> list[Setup]:
    x, y = _digits()
    all_setups = {
        "mlp": Setup("mlp", x, y, _mlp, nn.CrossEntropyLoss(), 0.0, 0.1),
        "cnn": Setup("cnn", x.view(-1, 1, 8, 8), y, _cnn, nn.CrossEntropyLoss(), 0.9, 0.01),
        "mse": Setup("mse", *_teacher_data(), _student, nn.MSELoss(), 0.0, 0.05),
    }
    out = []
    for name in names:
        s = all_setups[name]
        torch.manual_seed(0)
        model = s.make()
        opt = torch.optim.SGD(model.parameters(), lr=s.ckpt_lr, momentum=s.momentum)
        for xb, yb in draw_batches((s.x, s.y), 32, 300, torch.Generator().manual_seed(1)):
            opt.zero_grad()
            s.loss(model(xb), yb).backward()
            opt.step()
        s.state = _clone(model.state_dict())
        s.opt_state = _clone(opt.state_dict()) if s.momentum else {}
        with torch.no_grad():
            s.loss0 = float(s.loss(model(s.x), s.y))
        out.append(s)
    return out


# --------------------------------------------------------------------------- real runs


def real_run(s: Setup, lr: float, b: int, seed: int, steps: int = STEPS):
    """(blow-up step or None, seconds, steps taken) of one real run from the checkpoint."""
    model, opt = s.fresh(lr)
    batches = draw_batches((s.x, s.y), b, steps, torch.Generator().manual_seed(10_000 + seed))
    window = deque(maxlen=math.ceil(32 / b))
    t0 = time.perf_counter()
    for t, (xb, yb) in enumerate(batches):
        opt.zero_grad()
        loss = s.loss(model(xb), yb)
        v = float(loss.detach())
        window.append(v)
        if not math.isfinite(v) or sum(window) / len(window) > BLOWUP * s.loss0:
            return t, time.perf_counter() - t0, t
        loss.backward()
        opt.step()
    return None, time.perf_counter() - t0, steps


def blows(s: Setup, lr: float, b: int, seeds=(100, 101, 102)) -> bool:
    hits = 0
    for i, seed in enumerate(seeds):
        hits += real_run(s, lr, b, seed)[0] is not None
        if hits * 2 > len(seeds) or (hits + len(seeds) - i - 1) * 2 <= len(seeds):
            break
    return hits * 2 > len(seeds)


def find_blowup_lr(s: Setup, b: int, start: float, bisections: int) -> float:
    lo, hi = None, None
    lr = start
    for _ in range(12):
        if blows(s, lr, b):
            hi = lr
            if lo is not None:
                break
            lr /= 2
        else:
            lo = lr
            if hi is not None:
                break
            lr *= 2
    if lo is None or hi is None:
        raise RuntimeError(f"{s.name} B={b}: no bracket for the blow-up lr")
    for _ in range(bisections):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if blows(s, mid, b) else (mid, hi)
    return math.sqrt(lo * hi)


# --------------------------------------------------------------------------- criteria


def full_sharpness(s: Setup) -> tuple[float, float]:
    model, _ = s.fresh(0.0)
    model.eval()
    t0 = time.perf_counter()
    res = hessian_sharpness(lambda: s.loss(model(s.x), s.y), list(model.parameters()), tol=1e-4)
    return res.value, time.perf_counter() - t0


def probe_curvature(s: Setup, seed: int):
    model, _ = s.fresh(0.0)
    idx = torch.randperm(s.n, generator=torch.Generator().manual_seed(500 + seed))[:PROBE]
    t0 = time.perf_counter()
    rep = tc.measure_curvature(model, s.x[idx], s.y[idx], s.loss, n=s.n, seed=seed)
    return rep, time.perf_counter() - t0


def probe_sigma(rep) -> float:
    return rep.sigma_full if rep.sigma_full is not None else rep.stats.sigma


def gd_limit(lr: float, beta: float) -> float:
    return 2 * (1 + beta) / lr


@dataclass
class Run:
    setup: str
    b: int
    factor: float
    seed: int
    blowup_step: int | None
    warn: dict[str, bool]
    cost: dict[str, float]  # seconds
    blowup_lr: float = math.nan


def la_rules(res, k: int, tag: str = "") -> tuple[dict[str, bool], float]:
    warn = {}
    for c in LA_MULTIPLES[:2]:
        warn[f"LA {k}, {c:g}x{tag}"] = res.blowup_lr <= c * res.lr * (1 + 1e-12)
    return warn, res.seconds


def critical_lrs(s: Setup, b: int, lr_star: float, seeds: list[int], args) -> list[Run]:
    """Only the k = 20 lookahead's refined ``blowup_lr`` (no criteria, no real runs)."""
    runs = []
    for factor in args.factors:
        for seed in seeds:
            model, opt = s.fresh(factor * lr_star)
            gen = torch.Generator().manual_seed(20_000 + 97 * seed + 20)
            res = lookahead(
                model,
                opt,
                s.loss,
                draw_batches((s.x, s.y), b, 20, gen),
                multiples=LA_MULTIPLES,
                refine=REFINE,
            )
            runs.append(Run(s.name, b, factor, seed, None, {}, {}, res.blowup_lr))
    return runs


FACTORS = (3.0, 5.0, 10.0)  # lookahead thresholds scored by --lookahead-only


def lookahead_only(s: Setup, b: int, lr_star: float, seeds: list[int], ks, ctx) -> list[Run]:
    """Lookaheads at the current lr only, scored at several thresholds via ``peak_loss``."""
    runs = []
    for factor in LR_FACTORS:
        lr = factor * lr_star
        for seed in seeds:
            warn, cost, ratio = {}, {}, {}
            draws = [(k, 20_000 + 97 * seed + k) for k in LA_STEPS] + [(10, 30_000 + 97 * seed)]
            for k, gseed in draws:
                model, opt = s.fresh(lr)
                batches = draw_batches((s.x, s.y), b, k, torch.Generator().manual_seed(gseed))
                res = lookahead(model, opt, s.loss, batches, multiples=(1.0,), refine=0)
                tag = f"{k}'" if gseed >= 30_000 else f"{k}"
                ratio[tag], cost[tag] = res.peak_loss[0] / res.loss_start, res.seconds
            for f in FACTORS:
                for tags in (("5",), ("10",), ("20",), ("5", "10"), ("10", "10'")):
                    name = f"LA {' or '.join(tags)}, 1x, > {f:g}x"
                    warn[name] = any(ratio[t] > f for t in tags)
                    cost[name] = sum(cost[t] for t in tags)
            step, secs, nsteps = real_run(s, lr, b, seed)
            ctx["step_times"].append(secs / max(nsteps, 1))
            runs.append(Run(s.name, b, factor, seed, step, warn, cost))
    return runs


def evaluate(s: Setup, b: int, lr_star: float, seeds: list[int], ks, ctx, args) -> list[Run]:
    if args.only_blowup_lr:
        return critical_lrs(s, b, lr_star, seeds, args)
    if args.lookahead_only:
        return lookahead_only(s, b, lr_star, seeds, ks, ctx)
    runs = []
    for factor in args.factors:
        lr = factor * lr_star
        for seed in seeds:
            warn, cost = {}, {}
            rep, rep_s = ctx["probe"][seed]
            for label, sharp in (("T1 probe", rep.hessian_sharpness), ("T1 full", ctx["lam"])):
                r = tc.stability_report(sharp, probe_sigma(rep), lr, b, s.n, momentum=s.momentum)
                warn[label] = r.unstable
            cost["T1 probe"] = rep_s
            cost["T1 full"] = rep_s + ctx["lam_s"]
            if ctx["linear"] and seed in ctx["linear_seeds"] and rep.gram is not None:
                t0 = time.perf_counter()
                rho = tc.mean_square_rate(rep.gram, lr, b, s.n, momentum=s.momentum, tol=1e-4)
                warn["rho(T) > 1"], cost["rho(T) > 1"] = rho > 1, rep_s + time.perf_counter() - t0
                if not args.no_gamma:
                    t0 = time.perf_counter()
                    gam = tc.lyapunov_exponent(
                        rep.gram, lr, b, s.n, momentum=s.momentum, steps=300, repeats=8, seed=seed
                    )
                    warn["gamma > 0"] = gam.value > 0
                    cost["gamma > 0"] = rep_s + time.perf_counter() - t0
            bs, bs_s = ctx["bs"][(b, seed)]
            warn["BS >= 2(1+beta)/lr"], cost["BS >= 2(1+beta)/lr"] = (
                bs >= gd_limit(lr, s.momentum),
                bs_s,
            )
            blowup_lr = math.nan
            for k in ks:
                model, opt = s.fresh(lr)
                gen = torch.Generator().manual_seed(20_000 + 97 * seed + k)
                la_batches = draw_batches((s.x, s.y), b, k, gen)
                res = lookahead(
                    model,
                    opt,
                    s.loss,
                    la_batches,
                    multiples=LA_MULTIPLES,
                    refine=REFINE if k == max(ks) else 0,
                )
                w, sec = la_rules(res, k)
                warn.update(w)
                cost.update(dict.fromkeys(w, sec))
                if k == max(ks):
                    blowup_lr = res.blowup_lr
            # the default rule: either of two short runs at the current lr, on independent
            # draws of 5 and 10 batches, blew up
            if 5 in ks and 10 in ks:
                name = "LA 5 or LA 10, 1x (default)"
                warn[name] = warn["LA 5, 1x"] or warn["LA 10, 1x"]
                cost[name] = cost["LA 5, 1x"] + cost["LA 10, 1x"]
                model, opt = s.fresh(lr)
                gen = torch.Generator().manual_seed(30_000 + 97 * seed)
                res = lookahead(
                    model,
                    opt,
                    s.loss,
                    draw_batches((s.x, s.y), b, 10, gen),
                    multiples=(1.0,),
                    refine=0,
                )
                name = "LA 10 or LA 10', 1x"
                warn[name] = warn["LA 10, 1x"] or res.predicted
                cost[name] = cost["LA 10, 1x"] + res.seconds
            if args.real_batches:
                model, opt = s.fresh(lr)
                real = draw_batches((s.x, s.y), b, 10, torch.Generator().manual_seed(10_000 + seed))
                res = lookahead(model, opt, s.loss, real, multiples=(1.0,), refine=0)
                warn["LA 10, 1x (real batches)"] = res.predicted
                cost["LA 10, 1x (real batches)"] = res.seconds
            step, secs, nsteps = real_run(s, lr, b, seed)
            ctx["step_times"].append(secs / max(nsteps, 1))
            runs.append(Run(s.name, b, factor, seed, step, warn, cost, blowup_lr))
    return runs


# --------------------------------------------------------------------------- draws mode

DRAWS = {10: 4, 20: 2}  # short runs of k steps at the current lr: independent draws per k
BRACKET_REFINE = 4  # refine runs of the draw-0 bracket (1, 2, 4) x lr; fewer are replayed
RULES = (  # (name, k of each draw in order): draw j of every k uses the same generator
    ("1 x 10", (10,)),
    ("2 x 10", (10, 10)),
    ("3 x 10", (10, 10, 10)),
    ("4 x 10", (10, 10, 10, 10)),
    ("1 x 20", (20,)),
    ("2 x 20", (20, 20)),
    ("20 + 10", (20, 10)),
    ("20 + 10 + 10", (20, 10, 10)),
)


def probe_generator(seed: int, draw: int, step: int = 0) -> torch.Generator:
    """The generator ``CoherenceProbe`` draws lookahead batches with (probe seed ``seed``,
    optimizer step ``step``, draw index ``draw``), so that the draws scored here are the
    batches the probe's pre-flight lookahead sees in ``--e2e``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + draw)


@dataclass
class DrawRun:
    setup: str
    b: int
    factor: float
    seed: int
    lr: float
    blowup_step: int | None
    ratio: dict[str, float]  # "k/j" -> peak loss / starting loss of draw j's k-step run at 1x
    cost: dict[str, float]  # "k/j" -> seconds of that short run
    bracket: list  # draw 0, k = 10: [(multiple, blew_up), ...] in the order run
    step_s: float = math.nan
    # --trajectories: "k/j" -> (loss_start, loss_end, step losses) of the short run at 1x,
    # run with blowup_factor=inf so that it never stops early (a non-finite loss still stops it)
    traj: dict = field(default_factory=dict)


def lookahead_draws(
    s: Setup,
    b: int,
    lr_star: float,
    seeds: list[int],
    factors=LR_FACTORS,
    trajectories: bool = False,
) -> list[DrawRun]:
    """Per run: independent draws of k-step short runs at the current lr (``DRAWS``), the
    probe's bracket on draw 0 (k = 10, multiples (1, 2, 4), ``refine=BRACKET_REFINE``), and
    the real run; rules and brackets are scored from these afterwards (``score_draws``)."""
    runs = []
    data = (s.x, s.y)
    for factor in factors:
        lr = factor * lr_star
        for seed in seeds:
            ratio, cost, bracket, traj = {}, {}, [], {}
            for k, count in DRAWS.items():
                for j in range(count):
                    model, opt = s.fresh(lr)
                    batches = draw_batches(data, b, k, probe_generator(seed, j))
                    first = k == 10 and j == 0 and not trajectories
                    res = lookahead(
                        model,
                        opt,
                        s.loss,
                        batches,
                        multiples=LA_MULTIPLES if first else (1.0,),
                        refine=BRACKET_REFINE if first else 0,
                        blowup_factor=math.inf if trajectories else BLOWUP,
                    )
                    if trajectories:
                        traj[f"{k}/{j}"] = (res.loss_start, res.loss_end[0], res.step_losses[0])
                    ratio[f"{k}/{j}"] = res.peak_loss[0] / res.loss_start
                    # one short run's share of the lookahead's time
                    cost[f"{k}/{j}"] = res.seconds / max(len(res.tested), 1)
                    if first:
                        bracket = [list(t) for t in res.tested]
            step, secs, nsteps = real_run(s, lr, b, seed)
            runs.append(
                DrawRun(
                    s.name, b, factor, seed, lr, step, ratio, cost, bracket, secs / nsteps, traj
                )
            )
    return runs


def _bracket_lr(run: DrawRun, refine: int) -> float:
    """``blowup_lr`` the bracket would give with ``refine`` refine runs (replayed)."""
    tried = run.bracket[: len(LA_MULTIPLES) + refine]
    blown = [c for c, b in tried if b]
    return min(blown) * run.lr if blown else math.inf


def _logged_before(run: DrawRun) -> float:
    """``stability/blowup_lr`` as ``CoherenceProbe`` logged it with ``refine=0``: draw 0's
    (1, 2, 4) bracket, or the current lr when draw 1 blew up at it (the minimum of both)."""
    value = _bracket_lr(run, 0)
    return min(value, run.lr) if run.ratio["10/1"] > BLOWUP else value


def _rule_warns(run: DrawRun, ks: tuple[int, ...], factor: float = BLOWUP) -> bool:
    return any(run.ratio[f"{k}/{j}"] > factor for j, k in enumerate(ks))


def _seed_label(seeds: list[int]) -> str:
    return f"seeds {min(seeds)}-{max(seeds)}" if seeds else "no seeds"


def score_draws(runs: list[DrawRun], seeds: list[int]) -> None:
    """Recall / false alarms / lead / cost of every rule in ``RULES``, and the probe's
    bracket's ``blowup_lr`` against ``lr*``, on the runs of ``seeds``."""
    runs = [r for r in runs if r.seed in seeds]
    setups = list(dict.fromkeys(r.setup for r in runs))
    print(f"\n## Lookahead rules at the current lr, blow-up factor 10 ({_seed_label(seeds)})\n")
    head = " | ".join(f"{n} recall | {n} false alarms | {n} lead | {n} cost" for n in setups)
    print(f"| rule (k per draw) | {head} |")
    print("| --- |" + " --- | --- | --- | --- |" * len(setups))
    for name, ks in RULES:
        cells = []
        for n in setups:
            rs = [r for r in runs if r.setup == n]
            blown = [r for r in rs if r.blowup_step is not None]
            calm = [r for r in rs if r.blowup_step is None]
            hit = [r for r in blown if _rule_warns(r, ks)]
            fa = sum(_rule_warns(r, ks) for r in calm)
            leads = [r.blowup_step for r in hit]
            lead = f"{statistics.median(leads):.0f} [{min(leads)}]" if leads else "-"
            cost = statistics.median(
                sum(r.cost[f"{k}/{j}"] for j, k in enumerate(ks)) / r.step_s for r in rs
            )
            cells += [_pct(len(hit), len(blown)), _pct(fa, len(calm)), lead, f"{cost:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n## Bracket blowup_lr / lr* ({_seed_label(seeds)}; draw 0, k = 10, (1, 2, 4) x lr)\n")
    refines = (0, 1, 2, 3, BRACKET_REFINE)
    print(
        "| setup | B | "
        + " | ".join(f"refine={r}: within 1.5x / 2x | refine={r}: median" for r in refines)
        + " | logged with refine=0 (min with draw 1): within 1.5x / 2x"
        + " | extra runs (median, refine=4) |"
    )
    print("| --- | --- |" + " --- | --- |" * len(refines) + " --- | --- |")
    lr_star = {(r.setup, r.b): r.lr / r.factor for r in runs}
    for n in setups:
        for b in BATCH_SIZES:
            rs = [r for r in runs if (r.setup, r.b) == (n, b)]
            if not rs:
                continue
            cells = []
            for ref in refines:
                rat = [_bracket_lr(r, ref) / lr_star[(n, b)] for r in rs]
                c15 = sum(1 / 1.5 <= x <= 1.5 for x in rat)
                c2 = sum(0.5 <= x <= 2 for x in rat)
                cells += [f"{c15}/{len(rat)} / {c2}/{len(rat)}", f"{statistics.median(rat):.2f}"]
            rat = [_logged_before(r) / lr_star[(n, b)] for r in rs]
            c15, c2 = sum(1 / 1.5 <= x <= 1.5 for x in rat), sum(0.5 <= x <= 2 for x in rat)
            cells.append(f"{c15}/{len(rat)} / {c2}/{len(rat)}")
            extra = statistics.median(len(r.bracket) - len(LA_MULTIPLES) for r in rs)
            print(f"| {n} | {b} | " + " | ".join(cells) + f" | {extra:g} |")


WINDOW_EXAMPLES = 32  # the real runs' blow-up window: ceil(32 / B) mini-batch losses


def _traj_blew(traj, b: int, how: str, factor: float = BLOWUP) -> bool:
    """Whether a short run (``--trajectories``: loss_start, loss_end, step losses) blew up:
    ``raw`` any step loss or loss_end above ``factor`` x loss_start; ``window`` the mean of
    the last ceil(32 / B) step losses (the real runs' own rule) or loss_end above it;
    ``end`` only loss_end. A non-finite loss is a blow-up for all three."""
    start, end, losses = traj
    limit = factor * start
    if not all(math.isfinite(v) for v in [*losses, end]):
        return True
    if end > limit:
        return True
    if how == "raw":
        return max(losses) > limit
    if how == "window":
        w = math.ceil(WINDOW_EXAMPLES / b)
        return any(
            sum(losses[max(0, t - w + 1) : t + 1]) / len(losses[max(0, t - w + 1) : t + 1]) > limit
            for t in range(len(losses))
        )
    return False


def score_traj(runs: list[DrawRun], seeds: list[int]) -> None:
    """Rules of ``RULES`` under the three short-run blow-up tests of ``_traj_blew``."""
    runs = [r for r in runs if r.seed in seeds and r.traj]
    setups = list(dict.fromkeys(r.setup for r in runs))
    print(f"\n## Short-run blow-up tests x rules, factor 10 ({_seed_label(seeds)})\n")
    head = " | ".join(f"{n} recall | {n} false alarms" for n in setups)
    print(f"| test | rule | {head} | cnn B=8 | cnn B=32 | cnn B=128 |")
    print("| --- | --- |" + " --- | --- |" * len(setups) + " --- | --- | --- |")
    for how in ("raw", "window", "end"):
        for name, ks in RULES:

            def warns(r, ks=ks, how=how):
                return any(_traj_blew(r.traj[f"{k}/{j}"], r.b, how) for j, k in enumerate(ks))

            cells = []
            for n in setups:
                rs = [r for r in runs if r.setup == n]
                blown = [r for r in rs if r.blowup_step is not None]
                calm = [r for r in rs if r.blowup_step is None]
                cells += [
                    _pct(sum(map(warns, blown)), len(blown)),
                    _pct(sum(map(warns, calm)), len(calm)),
                ]
            for b in BATCH_SIZES:
                rs = [r for r in runs if (r.setup, r.b) == ("cnn", b)]
                bl = [r for r in rs if r.blowup_step is not None]
                ok = [r for r in rs if r.blowup_step is None]
                cells.append(f"{sum(map(warns, bl))}/{len(bl)}, {sum(map(warns, ok))}/{len(ok)}")
            print(f"| {how} | {name} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------- end to end

E2E_IDENTITY_FACTORS = (0.5, 1.25)  # runs repeated without the probe (bit-identity check)


def _train_with(s: Setup, lr: float, b: int, seed: int, monitor_opts: dict | None):
    """The real run of ``real_run``, optionally through ``CoherenceMonitor`` (its ``start``
    before the first step, its ``step(opt, B, loss)`` after each one). Returns the blow-up
    step, the step of each ``BlowupWarning`` (0: the pre-flight probe), seconds of training
    and of the monitor, the losses, the final model and optimizer, and the monitor."""
    model, opt = s.fresh(lr)
    batches = draw_batches((s.x, s.y), b, STEPS, torch.Generator().manual_seed(10_000 + seed))
    window = deque(maxlen=math.ceil(32 / b))
    monitor, warn_steps, other = None, [], {}
    train_s = probe_s = 0.0
    losses: list[float] = []
    blowup = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def collect(step: int) -> None:
            for w in caught:
                if issubclass(w.category, tc.BlowupWarning):
                    warn_steps.append(step)
                else:
                    other[w.category.__name__] = other.get(w.category.__name__, 0) + 1
            caught.clear()

        if monitor_opts is not None:
            t0 = time.perf_counter()
            monitor = tc.CoherenceMonitor(
                model,
                s.loss,
                torch.utils.data.TensorDataset(s.x, s.y),
                seed=seed,
                **monitor_opts,
            )
            monitor.start(opt, batch_size=b)
            probe_s += time.perf_counter() - t0
            collect(0)
        for t, (xb, yb) in enumerate(batches):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = s.loss(model(xb), yb)
            v = float(loss.detach())
            losses.append(v)
            window.append(v)
            if not math.isfinite(v) or sum(window) / len(window) > BLOWUP * s.loss0:
                blowup = t
                break
            loss.backward()
            opt.step()
            train_s += time.perf_counter() - t0
            if monitor is not None:
                t0 = time.perf_counter()
                monitor.step(opt, batch_size=b, loss=loss.detach())
                probe_s += time.perf_counter() - t0
                collect(t + 1)
    steps = blowup if blowup is not None else STEPS
    return dict(
        blowup=blowup,
        warn_steps=warn_steps,
        other=other,
        train_s=train_s,
        probe_s=probe_s,
        steps=steps,
        losses=losses,
        model=model,
        opt=opt,
        monitor=monitor,
    )


def _identical(a: dict, b: dict) -> bool:
    if a["losses"] != b["losses"]:
        return False
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    if any(not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    oa, ob = a["opt"].state_dict()["state"], b["opt"].state_dict()["state"]
    return all(
        torch.equal(oa[i][k], ob[i][k])
        for i in oa
        for k in oa[i]
        if isinstance(oa[i][k], torch.Tensor)
    )


@dataclass
class E2ERun:
    setup: str
    b: int
    factor: float
    seed: int
    blowup_step: int | None
    warn_steps: list[int]
    other_warnings: dict[str, int]
    probe_s: float
    preflight_s: float
    step_s: float
    blowup_lr: float  # stability/blowup_lr of the pre-flight probe
    probes: dict[str, int]  # probes by kind
    identical: bool | None
    # (step, kind, trigger or escalation reason) of every probe in the monitor's history
    probe_log: list = field(default_factory=list)


def e2e(
    s: Setup, b: int, lr_star: float, seeds: list[int], opts: dict, factors=LR_FACTORS
) -> list[E2ERun]:
    runs = []
    for factor in factors:
        lr = factor * lr_star
        for seed in seeds:
            out = _train_with(s, lr, b, seed, opts)
            hist = out["monitor"].history
            identical = None
            step_s = out["train_s"] / max(out["steps"], 1)
            if factor in E2E_IDENTITY_FACTORS:
                bare = _train_with(s, lr, b, seed, None)
                identical = _identical(out, bare)
                step_s = bare["train_s"] / max(bare["steps"], 1)
            kinds: dict[str, int] = {}
            for h in hist:
                kinds[h["kind"]] = kinds.get(h["kind"], 0) + 1
            pre = hist[0] if hist and hist[0]["kind"] == "preflight" else {}
            runs.append(
                E2ERun(
                    s.name,
                    b,
                    factor,
                    seed,
                    out["blowup"],
                    out["warn_steps"],
                    out["other"],
                    out["probe_s"],
                    float(pre.get("probe/seconds", math.nan)),
                    step_s,
                    float(pre.get("stability/blowup_lr", math.nan)),
                    kinds,
                    identical,
                    [[h["step"], h["kind"], h.get("trigger") or h.get("escalate")] for h in hist],
                )
            )
    return runs


def _probe_source(r: E2ERun, step: int) -> str:
    """Which probe issued the BlowupWarning collected at ``step``: ``preflight``,
    ``escalated`` (a triggered probe answering a light probe's escalation), ``guard``
    (triggered by the loss guard), ``scheduled``, or ``?`` when no probe ran then."""
    for s, kind, why in r.probe_log:
        if s == step and kind != "light":
            if kind == "triggered":
                return "escalated" if (why or "").startswith("tracked sharpness") else "guard"
            return kind
    return "?"


def _header(title: str, columns: str) -> None:
    """A markdown section title and table header of the ``|``-separated ``columns``."""
    print(f"\n## {title}\n")
    print(f"| {columns} |")
    print("|" + " --- |" * (columns.count("|") + 1))


def e2e_sources(runs: list[E2ERun]) -> None:
    """Full probes that answered a light probe's escalation or the loss guard, and the
    hits / false alarms their BlowupWarnings added (warnings after the pre-flight probe)."""
    if not any(r.probe_log for r in runs):
        return
    _header(
        "Probes after the pre-flight one, and what their BlowupWarnings added",
        "setup | light probes | escalated full probes | guard-triggered probes | scheduled | "
        "warnings by source (blown-up runs before the blow-up / calm runs) | "
        "hits only from later probes | false alarms only from later probes",
    )
    for n in dict.fromkeys(r.setup for r in runs):
        rs = [r for r in runs if r.setup == n]
        count = {"light": 0, "escalated": 0, "guard": 0, "scheduled": 0}
        src: dict[str, list[int]] = {}
        late_hit = late_fa = 0
        for r in rs:
            for _, kind, why in r.probe_log:
                if kind == "light":
                    count["light"] += 1
                elif kind == "triggered":
                    esc = (why or "").startswith("tracked sharpness")
                    count["escalated" if esc else "guard"] += 1
                elif kind == "scheduled":
                    count["scheduled"] += 1
            blown = r.blowup_step is not None
            ws = [w for w in r.warn_steps if not blown or w < r.blowup_step]
            for w in ws:
                src.setdefault(_probe_source(r, w), [0, 0])[0 if blown else 1] += 1
            if ws and 0 not in ws:
                late_hit += blown
                late_fa += not blown
        cells = ", ".join(f"{k} {a}/{c}" for k, (a, c) in src.items()) or "-"
        print(
            f"| {n} | {count['light']} | {count['escalated']} | {count['guard']} | "
            f"{count['scheduled']} | {cells} | {late_hit} | {late_fa} |"
        )


def _linear(runs: list[E2ERun]) -> int:
    return sum("LinearInstabilityWarning" in r.other_warnings for r in runs)


def e2e_tables(runs: list[E2ERun], lr_star: dict[tuple[str, int], float]) -> None:
    _header(
        "End to end through CoherenceMonitor / CoherenceProbe (BlowupWarning)",
        "setup | recall | false alarms | lead, median [min] | hits by the pre-flight probe | "
        "pre-flight probe (steps, median) | all probes (steps, median) | bit-identical | "
        "LinearInstabilityWarning: blown-up / calm runs",
    )
    for n in dict.fromkeys(r.setup for r in runs):
        rs = [r for r in runs if r.setup == n]
        blown = [r for r in rs if r.blowup_step is not None]
        calm = [r for r in rs if r.blowup_step is None]
        hit = [r for r in blown if any(w < r.blowup_step for w in r.warn_steps)]
        leads = [r.blowup_step - min(r.warn_steps) for r in hit]
        pre = sum(0 in r.warn_steps for r in hit)
        fa = sum(bool(r.warn_steps) for r in calm)
        lead = f"{statistics.median(leads):.0f} [{min(leads)}]" if leads else "-"
        ident = [r.identical for r in rs if r.identical is not None]
        print(
            f"| {n} | {_pct(len(hit), len(blown))} | {_pct(fa, len(calm))} | {lead} | "
            f"{pre}/{len(hit)} | {statistics.median(r.preflight_s / r.step_s for r in rs):.0f} | "
            f"{statistics.median(r.probe_s / r.step_s for r in rs):.0f} | "
            f"{sum(ident)}/{len(ident)} | {_linear(blown)}/{len(blown)}, "
            f"{_linear(calm)}/{len(calm)} |"
        )
    print("\n## stability/blowup_lr of the pre-flight probe / lr*\n")
    print("| setup | B | within 1.5x | within 2x | median [range] | inf |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (n, b), star in lr_star.items():
        rat = [r.blowup_lr / star for r in runs if (r.setup, r.b) == (n, b)]
        if not rat:
            continue
        fin = [x for x in rat if math.isfinite(x)]
        rng = f"{statistics.median(fin):.2f} [{min(fin):.2f}, {max(fin):.2f}]" if fin else "-"
        print(
            f"| {n} | {b} | {sum(1 / 1.5 <= x <= 1.5 for x in rat)}/{len(rat)} | "
            f"{sum(0.5 <= x <= 2 for x in rat)}/{len(rat)} | {rng} | {len(rat) - len(fin)} |"
        )
    kinds: dict[str, int] = {}
    for r in runs:
        for k, v in r.probes.items():
            kinds[k] = kinds.get(k, 0) + v
    print(f"\nprobes by kind over {len(runs)} runs: {kinds}")
    e2e_sources(runs)


# --------------------------------------------------------------------------- tables


def _pct(num: int, den: int) -> str:
    return "n/a" if den == 0 else f"{100 * num / den:.0f}% ({num}/{den})"


def table(runs: list[Run], step_time: dict[tuple[str, int], float]) -> list[str]:
    names = list(dict.fromkeys(k for r in runs for k in r.warn))
    lines = [
        "| criterion | recall | false alarms | lead (median [min]) | cost (steps) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        rs = [r for r in runs if name in r.warn]
        blown = [r for r in rs if r.blowup_step is not None]
        calm = [r for r in rs if r.blowup_step is None]
        hit = [r for r in blown if r.warn[name]]
        fa = sum(r.warn[name] for r in calm)
        leads = [r.blowup_step for r in hit]
        lead = f"{statistics.median(leads):.0f} [{min(leads)}]" if leads else "-"
        costs = [r.cost[name] / step_time[(r.setup, r.b)] for r in rs]
        lines.append(
            f"| {name} | {_pct(len(hit), len(blown))} | {_pct(fa, len(calm))} | {lead} | "
            f"{statistics.median(costs):.0f} |"
        )
    return lines


def blowup_lr_table(calib, all_runs: list[Run], factors) -> None:
    print("\n## Lookahead blowup_lr / lr* (k = 20, multiples 1, 2, 4, refine = 4)\n")
    print("| setup | " + " | ".join(f"lr = {f:g} lr*" for f in factors) + " | within 1.5x |")
    print("| --- |" + " --- |" * (len(factors) + 1))
    for name, b, _, lr_star, *_ in calib:
        cells, close, total = [], 0, 0
        for f in factors:
            rat = [
                r.blowup_lr / lr_star for r in all_runs if (r.setup, r.b, r.factor) == (name, b, f)
            ]
            fin = [x for x in rat if math.isfinite(x)]
            close += sum(1 / 1.5 <= x <= 1.5 for x in fin)
            total += len(rat)
            cells.append(
                f"{statistics.median(fin):.2f} [{min(fin):.2f}, {max(fin):.2f}]"
                + (f" ({len(rat) - len(fin)} inf)" if len(fin) < len(rat) else "")
                if fin
                else f"inf ({len(rat)})"
            )
        print(f"| {name} B={b} | " + " | ".join(cells) + f" | {close}/{total} |")


def cached_lr_star(s: Setup, b: int, path: str | None, bisections: int) -> float:
    """``lr*`` of ``find_blowup_lr`` (deterministic), read from / added to the JSON ``path``."""
    key = f"{s.name}/{b}"
    cache = {}
    if path and os.path.exists(path):
        with open(path) as fh:
            cache = json.load(fh)
    if key in cache:
        return float(cache[key])
    lam, _ = full_sharpness(s)
    t0 = time.perf_counter()
    value = find_blowup_lr(s, b, gd_limit(1.0, s.momentum) / lam, bisections)
    print(f"  {key}: lr* = {value:.4g} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if path:
        if os.path.exists(path):  # another process may have added keys meanwhile
            with open(path) as fh:
                cache = json.load(fh)
        cache[key] = value
        with open(path, "w") as fh:
            json.dump(cache, fh, indent=1)
    return value


def _parse_seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run_new_modes(args, seeds: list[int], t_start: float) -> None:
    """``--draws``, ``--e2e`` and ``--score``: see the module docstring."""
    if args.score:
        runs, e2e_runs, stars = [], [], {}
        for path in args.score.split(","):
            with open(path) as fh:
                saved = json.load(fh)
            runs += [DrawRun(**r) for r in saved["draws"]]
            e2e_runs += [E2ERun(**r) for r in saved.get("e2e", [])]
            for key, value in saved.get("lr_star", {}).items():
                name, b = key.split("/")
                stars[(name, int(b))] = value
        seeds = _parse_seeds(args.score_seeds)
        if e2e_runs:
            e2e_tables([r for r in e2e_runs if r.seed in seeds], stars)
        elif any(r.traj for r in runs):
            score_traj(runs, seeds)
        else:
            score_draws(runs, seeds)
        return
    setups = build_setups(args.setups.split(","))
    opts = {}
    if args.e2e_fast:
        opts = dict(lyapunov=False, criterion="theorem1")
    if args.e2e_estimates is not None:
        opts["estimates"] = args.e2e_estimates
    draws, e2e_runs, stars = [], [], {}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    factors = tuple(float(f) for f in args.lr_factors.split(",")) if args.lr_factors else LR_FACTORS
    for s in setups:
        for b in batch_sizes:
            lr_star = stars[(s.name, b)] = cached_lr_star(s, b, args.lr_star, 4)
            if args.draws:
                draws += lookahead_draws(s, b, lr_star, seeds, factors, args.trajectories)
            else:
                e2e_runs += e2e(s, b, lr_star, seeds, opts, factors)
            print(
                f"  {s.name} B={b}: lr*={lr_star:.4g}, done at "
                f"{time.perf_counter() - t_start:.0f} s, load={os.getloadavg()[0]:.2f}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(
                        {
                            "draws": [asdict(r) for r in draws],
                            "e2e": [asdict(r) for r in e2e_runs],
                            "lr_star": {f"{k[0]}/{k[1]}": v for k, v in stars.items()},
                        },
                        fh,
                    )
    if args.draws and not args.trajectories:
        score_draws(draws, seeds)
    elif args.e2e:
        print(
            f"\nprobe options: CoherenceMonitor defaults{' + ' + str(opts) if opts else ''}; "
            f"lookahead DEFAULT_STEPS = {DEFAULT_STEPS}"
        )
        e2e_tables(e2e_runs, stars)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load={os.getloadavg()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-minute smoke run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (5: a held-out grid)")
    p.add_argument("--setups", default="mlp,cnn,mse")
    p.add_argument("--linear-seeds", type=int, default=1, help="seeds with rho(T) and gamma")
    p.add_argument("--linear-setups", default="mse", help="setups with rho(T) and gamma")
    p.add_argument("--no-gamma", action="store_true")
    flags = {
        "--only-blowup-lr": "only the k = 20 lookahead's blowup_lr against lr* (no criteria)",
        "--lookahead-only": "only lookaheads at the current lr, scored at thresholds 3, 5, 10x",
        "--draws": "only independent lookahead draws at the current lr and the probe's bracket",
        "--trajectories": "with --draws: every draw's step losses (blowup_factor=inf), no bracket",
        "--e2e": "train through CoherenceMonitor, count BlowupWarnings",
        "--e2e-fast": "with --e2e: lyapunov=False, criterion='theorem1' (else the defaults)",
    }
    for flag, text in flags.items():
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--json", help="also write every run (criteria, blow-up step, costs) here")
    p.add_argument("--no-real-batches", dest="real_batches", action="store_false")
    p.add_argument("--lr-star", help="JSON cache of lr* per setup/B (read, and added to)")
    p.add_argument(
        "--e2e-estimates",
        default=None,
        help="with --e2e: the monitor's estimates= ('probe' skips the data-set estimates; "
        "default: the library default)",
    )
    p.add_argument(
        "--score", help="score the draws saved by --draws --json in these files (comma-separated)"
    )
    p.add_argument("--score-seeds", default="0-9", help="with --score: seeds a-b")
    p.add_argument("--batch-sizes", default="8,32,128", help="with --draws / --e2e")
    p.add_argument(
        "--lr-factors", dest="lr_factors", default=None, help="with --draws / --e2e: lr / lr* list"
    )
    args = p.parse_args()
    batch_sizes, ks, bisections = BATCH_SIZES, LA_STEPS, 4
    args.factors = LR_FACTORS
    if args.quick:
        args.seeds, batch_sizes, ks, bisections = 2, (32,), (5, 10), 2
        args.factors, args.no_gamma = (0.5, 2.0), True
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    t_start = time.perf_counter()
    print(
        f"# bench_warnings {' '.join(sys.argv[1:])}  threads={torch.get_num_threads()} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} load={os.getloadavg()}",
        flush=True,
    )
    if args.draws or args.e2e or args.score:
        run_new_modes(args, seeds, t_start)
        return
    setups = build_setups(args.setups.split(","))
    all_runs: list[Run] = []
    step_time: dict[tuple[str, int], float] = {}
    calib = []
    for s in setups:
        lam, lam_s = full_sharpness(s)
        probes = {seed: probe_curvature(s, seed) for seed in seeds}
        for b in batch_sizes:
            t0 = time.perf_counter()
            lr_star = find_blowup_lr(s, b, gd_limit(1.0, s.momentum) / lam, bisections)
            t_cal = time.perf_counter() - t0
            bs = {}
            for seed in seeds:
                model, _ = s.fresh(0.0)
                bb = draw_batches((s.x, s.y), b, 10, torch.Generator().manual_seed(700 + seed))
                t1 = time.perf_counter()
                bs[(b, seed)] = (tc.batch_sharpness(model, s.loss, bb), time.perf_counter() - t1)
            ctx = dict(
                probe=probes,
                lam=lam,
                lam_s=lam_s,
                bs=bs,
                step_times=[],
                linear_seeds=set(seeds[: args.linear_seeds]),
                linear=s.name in args.linear_setups.split(","),
            )
            runs = evaluate(s, b, lr_star, seeds, ks, ctx, args)
            times = ctx["step_times"]
            step_time[(s.name, b)] = statistics.median(times) if times else math.nan
            all_runs += runs
            ratios = [r.blowup_lr / lr_star for r in runs if math.isfinite(r.blowup_lr)]
            calib.append(
                (s.name, b, lam, lr_star, bs, step_time[(s.name, b)], ratios, t_cal, probes)
            )
            print(
                f"  {s.name} B={b}: lr*={lr_star:.4g} ({t_cal:.0f} s), grid done at "
                f"{time.perf_counter() - t_start:.0f} s, load={os.getloadavg()[0]:.2f}",
                flush=True,
            )
    print("\n## Setups and empirical blow-up lr\n")
    print(
        "| setup | B | loss at ckpt | lambda_1 full | 2(1+beta)/lambda_1 | lr* | "
        "BS (median) | 2(1+beta)/lr* | step (ms) | blowup_lr / lr* (median [range], n) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, b, lam, lr_star, bs, st, ratios, _, _ in calib:
        s = next(x for x in setups if x.name == name)
        rat = (
            f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}], {len(ratios)}"
            if ratios
            else "-"
        )
        print(
            f"| {name} | {b} | {s.loss0:.3f} | {lam:.4g} | {gd_limit(1, s.momentum) / lam:.4g} | "
            f"{lr_star:.4g} | {statistics.median(v for v, _ in bs.values()):.4g} | "
            f"{gd_limit(lr_star, s.momentum):.4g} | {1e3 * st:.2f} | {rat} |"
        )
    if not args.lookahead_only:
        blowup_lr_table(calib, all_runs, args.factors)
    if args.only_blowup_lr:
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load={os.getloadavg()}")
        return
    for s in setups:
        runs = [r for r in all_runs if r.setup == s.name]
        nb = sum(r.blowup_step is not None for r in runs)
        print(f"\n## {s.name}: {len(runs)} runs, {nb} blew up\n")
        print("\n".join(table(runs, step_time)))
    print("\n## Blow-ups by lr / lr* (all setups and B)\n")
    print("| lr / lr* | " + " | ".join(f"{f:g}" for f in args.factors) + " |")
    print("| --- |" + " --- |" * len(args.factors))
    for s in setups:
        for b in batch_sizes:
            row = []
            for f in args.factors:
                rs = [r for r in all_runs if r.setup == s.name and r.b == b and r.factor == f]
                row.append(f"{sum(r.blowup_step is not None for r in rs)}/{len(rs)}")
            print(f"| {s.name} B={b} | " + " | ".join(row) + " |")
    print("\n## Per batch size (recall / false alarms)\n")
    names = list(dict.fromkeys(k for r in all_runs for k in r.warn))
    keys = [(s.name, b) for s in setups for b in batch_sizes]
    print("| criterion | " + " | ".join(f"{n} B={b}" for n, b in keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name in names:
        cells = []
        for key in keys:
            rs = [r for r in all_runs if (r.setup, r.b) == key and name in r.warn]
            bl = [r for r in rs if r.blowup_step is not None]
            ok = [r for r in rs if r.blowup_step is None]
            rec = sum(r.warn[name] for r in bl)
            fa = sum(r.warn[name] for r in ok)
            cells.append(f"{rec}/{len(bl)}, {fa}/{len(ok)}" if rs else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "runs": [asdict(r) for r in all_runs],
                    "step_time": {f"{k[0]}/{k[1]}": v for k, v in step_time.items()},
                    "lr_star": {f"{c[0]}/{c[1]}": c[3] for c in calib},
                },
                fh,
            )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load={os.getloadavg()}")


if __name__ == "__main__":
    main()
