"""The per-step guard's loss rule on real training runs: how often it fires in runs that never
blow up, and before the ones that do.

The guard (:meth:`torch_coherence.probe.schedule.Schedule.observe`) triggers a full probe,
outside the time budget, when the training loss is non-finite or spikes. Each trigger costs
a full probe (tens to hundreds of training steps on small models), so a rule that fires on
batch noise costs a lot and, through the lookahead of the probe it triggers, can raise false
alarms. This script trains the blow-up grid of ``bench_warnings.py`` (same setups, same
checkpoints, lr in {0.25, 0.5, 0.8, 1.25, 2, 4} x ``lr*``, B in {8, 32, 128}, 300 steps)
without any probe, keeps every run's losses, and replays them through the shipped
``Schedule`` (no probe runs: a trigger is recorded and cleared at once), once as shipped and
once without the window-maximum condition (``SPIKE_OVER_MAX = 0``) for comparison.

Blow-up as in ``bench_warnings.py``: non-finite, or the mean of the last ceil(32 / B) losses
above 10x the checkpoint's full training loss.

    OMP_NUM_THREADS=1 python benchmarks/bench_guard.py --lr-star lr_star.json [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_warnings as bw

from torch_coherence.lookahead import draw_batches
from torch_coherence.probe import schedule as sched_mod

FACTORS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)


def trajectory(s: bw.Setup, lr: float, b: int, seed: int) -> list[float]:
    """The training losses of one real run (stopped once non-finite or above 1e6)."""
    model, opt = s.fresh(lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    losses = []
    for xb, yb in draw_batches((s.x, s.y), b, bw.STEPS, gen):
        opt.zero_grad()
        loss = s.loss(model(xb), yb)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or losses[-1] > 1e6:
            break
        loss.backward()
        opt.step()
    return losses


def blowup_step(losses: list[float], b: int, loss0: float) -> int | None:
    window: deque[float] = deque(maxlen=math.ceil(32 / b))
    for t, v in enumerate(losses):
        window.append(v)
        if not math.isfinite(v) or sum(window) / len(window) > bw.BLOWUP * loss0:
            return t
    return None


def triggers(losses: list[float], lr: float, max_triggered: int = 10) -> list[int]:
    """Steps at which the shipped guard asks for a probe (each granted one recorded at once)."""
    s = sched_mod.Schedule(every_n_steps=10**9, max_overhead=None, max_triggered=max_triggered)
    s.start()
    s.record(0, "preflight", 0.0, 10**9, lr)
    out = []
    for t, v in enumerate(losses):
        s.count_step()
        if s.observe(v, lr):
            out.append(t)
            s.record(s.steps, "triggered", 0.0, 10**9, lr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default="mlp,cnn,mse")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-offset", type=int, default=10)
    p.add_argument("--lr-star", default=None, help="JSON cache of lr* (bench_warnings.py's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs = []
    for s in bw.build_setups(args.setups.split(",")):
        for b in (8, 32, 128):
            lr_star = bw.cached_lr_star(s, b, args.lr_star, bisections=4)
            for f in FACTORS:
                for seed in range(args.seed_offset, args.seed_offset + args.seeds):
                    losses = trajectory(s, f * lr_star, b, seed)
                    runs.append((s.name, b, f * lr_star, losses, blowup_step(losses, b, s.loss0)))
    print(
        "setup | B | rule | calm runs | triggers in calm runs | blow-up runs | "
        "runs with a trigger before the blow-up"
    )
    for label, over_max in (("shipped", sched_mod.SPIKE_OVER_MAX), ("without the max", 0.0)):
        sched_mod.SPIKE_OVER_MAX = over_max
        for name in args.setups.split(","):
            for b in (8, 32, 128):
                mine = [r for r in runs if r[0] == name and r[1] == b]
                calm = [r for r in mine if r[4] is None]
                blown = [r for r in mine if r[4] is not None]
                n_calm = sum(len(triggers(r[3], r[2])) for r in calm)
                early = sum(any(t < r[4] for t in triggers(r[3], r[2])) for r in blown)
                print(f"{name} | {b} | {label} | {len(calm)} | {n_calm} | {len(blown)} | {early}")


if __name__ == "__main__":
    main()
