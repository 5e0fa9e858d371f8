"""Scripted stand-ins for the curvature engine and the lookahead (the probe's logic, not the
maths: the maths is tested against brute force in tests/curvature, tests/dynamics and
tests/test_lookahead.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from torch_coherence.lookahead import LookaheadResult
from torch_coherence.probe import CoherenceProbe

N, B, SIGMA, SHARP = 1000, 10, 4.0, 2.0


class ScriptedEngine:
    """Returns the sharpness and sigma it is told; ``clock``: advance a fake clock."""

    def __init__(self, sharpness=SHARP, sigma=SIGMA, clock=None, cost=0.0) -> None:
        self.sharpness, self.sigma, self.calls = sharpness, sigma, []
        self.clock, self.cost = clock, cost

    def __call__(self, model, inputs, targets, loss, **kwargs):
        self.calls.append(kwargs)
        if self.clock is not None:
            self.clock[0] += self.cost
        if isinstance(self.sharpness, Exception):
            raise self.sharpness
        stats = SimpleNamespace(
            sigma=self.sigma,
            lambda_S=self.sigma * 3.0,
            max_sample_sharpness=3.0,
            sharpness=self.sharpness,
        )
        return SimpleNamespace(
            stats=stats,
            hessian_sharpness=self.sharpness * 1.1,
            ggn_sharpness=self.sharpness,
            gradient_noise_scale=12.0,
            num_samples=int(inputs.shape[0]),
        )


class ScriptedLookahead:
    """A module-like stand-in for :mod:`torch_coherence.lookahead`: blows up at and above
    ``blowup_lr``; ``clock``/``cost``: advance a fake clock."""

    DEFAULT_STEPS = 5

    def __init__(self, blowup_lr=math.inf, clock=None, cost=0.0) -> None:
        self.blowup_lr, self.clock, self.cost, self.calls = blowup_lr, clock, cost, []

    def draw_batches(self, dataset, batch_size, steps, generator):
        idx = torch.randint(0, len(dataset), (steps, batch_size), generator=generator)
        self.calls.append(("draw", batch_size, steps, idx))
        return [dataset[int(i[0])] for i in idx]

    def lookahead(
        self,
        model,
        optimizer,
        loss,
        batches,
        *,
        multiples=(1.0, 2.0, 4.0),
        blowup_factor=10.0,
        forward_fn=None,
    ):
        if self.clock is not None:
            self.clock[0] += self.cost
        lr = max(float(g["lr"]) for g in optimizer.param_groups)
        multiples = tuple(multiples)
        blew = tuple(m * lr >= self.blowup_lr for m in multiples)
        first = next((m * lr for m, b in zip(multiples, blew, strict=True) if b), math.inf)
        self.calls.append(("lookahead", lr, len(batches), blowup_factor, multiples))
        return LookaheadResult(
            lr=lr,
            multiples=multiples,
            loss_start=1.0,
            loss_end=tuple(50.0 if b else 0.9 for b in blew),
            blew_up=blew,
            blowup_lr=first,
            steps=len(batches),
            seconds=self.cost,
        )


def scripted_probe(engine=None, **kw) -> CoherenceProbe:
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    kw.setdefault("every_n_steps", 1)
    kw.setdefault("max_overhead", None)
    kw.setdefault("criterion", "theorem1")  # the scripted engine has no Gram for gamma
    kw.setdefault("lookahead_module", ScriptedLookahead())
    kw.setdefault("dataset_size", N)
    return CoherenceProbe(
        loss=nn.CrossEntropyLoss(), probe=data, engine=engine or ScriptedEngine(), **kw
    )


def sgd(lr: float, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=lr, **kw)


def collect(seen: list):
    """A ``warn(text, category)`` that records both."""
    return lambda text, category: seen.append((text, category))
