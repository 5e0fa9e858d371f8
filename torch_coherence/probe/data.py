"""The probe's data: the fixed, seeded probe batch and the training set the lookahead draws
from (explicit tensors, a map-style dataset or a data loader's dataset)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Pairs", "sample_probe"]


def sample_probe(dataset: Any, size: int, seed: int) -> tuple[Any, Any]:
    """Draw ``size`` examples (all if fewer) without replacement, seeded, and collate them.

    Uses its own generator: the global RNG is untouched.
    """
    n = len(dataset)
    if n < 1:
        raise ValueError("probe dataset is empty")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(size, n)].sort().values
    samples = [dataset[int(i)] for i in idx]
    batch = torch.utils.data.default_collate(samples)
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ValueError(
            "probe dataset samples must be (input, target) pairs; pass explicit tensors as "
            "probe=(inputs, targets) otherwise"
        )
    return detach(batch[0]), detach(batch[1])


class Pairs:
    """Explicit ``(inputs, targets)`` tensors as a map-style dataset (for the lookahead)."""

    def __init__(self, inputs: Any, targets: Any) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return length(self.inputs)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return index(self.inputs, i), index(self.targets, i)


def index(x: Any, i: int) -> Any:
    if isinstance(x, dict):
        return {k: index(v, i) for k, v in x.items()}
    return x[i]


def is_batch_like(x: Any) -> bool:
    """Inputs of an explicit probe pair: a tensor or a dict of tensors."""
    return isinstance(x, (torch.Tensor, dict))


def length(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 0
    if isinstance(x, dict):
        return length(next(iter(x.values())))
    if isinstance(x, (tuple, list)):
        return length(x[0])
    return 0


def detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: detach(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(detach(v) for v in x)
    return x


def to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to(v, device) for v in x)
    return x
