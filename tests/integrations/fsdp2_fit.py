"""2-process FSDP2 training script: ``python fsdp2_fit.py OUTDIR``.

Spawns two gloo processes on the CPU. Each shards a small classifier with
``torch.distributed.fsdp.fully_shard`` (every block, then the root) and trains it twice from
the same initialisation, for a few SGD steps with momentum on its own half of every batch:
once running :func:`torch_coherence.integrations.distributed.measure_curvature_sharded` on a
fixed probe batch every ``PROBE_EVERY`` steps, once without. Written to OUTDIR:
``weights_probed.pt`` and ``weights_plain.pt`` (the final full weights, gathered by rank 0
for the comparison only), per rank ``history_<rank>.json`` (the probe results) and, at the
last probe, ``probe_weights.pt`` (the full weights the probe saw) and ``gram_<rank>.pt``
(the summed Gram).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WORLD = 2
STEPS = 6
PROBE_EVERY = 3
PROBE_SIZE = 12
N_TRAIN = 64
PER_RANK = 8


class Block(nn.Module):
    """Linear + tanh: the unit ``fully_shard`` is applied to."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(6, 16), Block(16, 12), nn.Linear(12, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN, 6, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN,), generator=gen)
    return x, y


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of every parameter: a collective, every rank must call it."""
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def train(rank: int, out: Path, probe: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    from torch_coherence.integrations.distributed import measure_curvature_sharded

    model = build_model()
    for block in model[:2]:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data()
    history = []
    for step in range(1, STEPS + 1):
        lo = ((step - 1) * WORLD + rank) * PER_RANK % N_TRAIN
        xb, yb = x[lo : lo + PER_RANK], y[lo : lo + PER_RANK]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        if probe and step % PROBE_EVERY == 0:
            last = step + PROBE_EVERY > STEPS
            if last:
                weights = full_state(model)
            res = measure_curvature_sharded(
                model, x[:PROBE_SIZE], y[:PROBE_SIZE], loss_fn, n=N_TRAIN
            )
            history.append(
                {
                    "step": step,
                    "sigma": res.stats.sigma,
                    "lambda_S": res.stats.lambda_S,
                    "max_sample_sharpness": res.stats.max_sample_sharpness,
                    "ggn_sharpness": res.ggn_sharpness,
                    "sigma_full": res.sigma_full,
                    "terms": [list(t) for t in res.terms],
                }
            )
            if last:
                torch.save(res.gram, out / f"gram_{rank}.pt")
                if rank == 0:
                    torch.save(weights, out / "probe_weights.pt")
    if probe:
        (out / f"history_{rank}.json").write_text(json.dumps(history))
    return full_state(model)


def worker(rank: int, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for probe, name in ((True, "probed"), (False, "plain")):
        final = train(rank, out, probe)
        if rank == 0:
            torch.save(final, out / f"weights_{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(target, free_port()), nprocs=WORLD)
