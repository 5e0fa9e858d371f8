"""The curvature probe under sharded data parallelism (FSDP2 ``fully_shard``) and DDP.

The block Gram K = A A^T is a sum over parameter blocks (docs/theory.md §3):
K = sum_l A^(l) A^(l)T, one term per layer, and the engine's ghost rule builds each term from
the layer's inputs a and output gradients delta alone, (delta_i . delta_j)(a_i . a_j), never
from the weights. So every rank runs the same probe forward pass and the same R backward
passes (under FSDP2 these all-gather one block's parameters at a time, as training does, so
no rank ever holds the whole model), which leaves the inputs and output gradients of every
layer, for all probe samples, on every rank. The layer terms are then dealt out: rank r
contracts only its own share of them (balanced by cost, the same table on every rank), one
``all_reduce`` sums the parts, and every rank computes sigma, lambda_1(S),
max_i lambda_1(H_i) and the GGN sharpness lambda_1(K)/m from the same K
(:func:`torch_coherence.coherence_from_gram`).

Why the passes are not split as well: the backward passes run only as deep as the earliest
layer they must reach, and under FSDP2 each block reached is all-gathered in backward; ranks
that measured different layers would issue different collectives and deadlock (measured:
gloo reports "Detected mismatch between collectives", all-gathers of 26 against 56 values).

Requirements, checked before anything is computed:

* every rank passes the same probe batch (a checksum is compared across ranks);
* every measured parameter belongs to a layer one of the engine's registered layer rules
  supports as configured (:func:`torch_coherence.curvature.layers.find_rule`: ``nn.Linear``,
  ``nn.Conv1d/2d``, ``nn.Embedding``, affine norms, ``nn.MultiheadAttention``). Other
  parameters would go to the engine's ``torch.func`` fallback, whose operations on sharded
  tensors are collectives of their own: they are refused, not approximated. Pass ``params=``
  to measure a covered subset.
* ``fully_shard`` is applied to containers (blocks, the root), not to an ``nn.Linear`` itself:
  FSDP2 turns the class of a module it shards into a subclass (``FSDPLinear``), which the
  engine's registry, keyed by exact type, does not recognise.

The engine's self-check (:mod:`torch_coherence.curvature.selfcheck`) compares every block with
autograd gradients taken with respect to the parameters. On plain replicas (DDP) it runs on
every rank with the same seed. Under FSDP2 the parameters of a sharded block are ``DTensor``
shards between its all-gathers, and autograd with respect to them does not give the block's
gradient (observed on the test model: the check found a correct sharded ``nn.Linear`` block
wrong, and its ``torch.func`` refit then failed on mixed ``Tensor``/``DTensor`` operands). So
under FSDP2 the check is switched off and the sharded result rests on the layer rules alone
(the test compares it with the single-process, self-checked engine).

Not computed here: the Hessian sharpness (its Lanczos products are the same on every rank and
gain nothing from the split) and the gradient noise scale.

Cost on DDP, where every rank holds the whole model, against rank 0 measuring alone and
broadcasting: ``benchmarks/bench_distributed.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._state import preserved_state
from ..coherence import CoherenceStats
from ..curvature.gram import Forward, GramFactors, gram_factors
from ..curvature.layers import find_rule
from ..curvature.losses import check_loss, output_curvature
from ..curvature.measure import _gram_stats, _sigma_full

__all__ = ["ShardedCurvature", "deal_terms", "measure_curvature_sharded"]


@dataclass(frozen=True)
class ShardedCurvature:
    """What :func:`measure_curvature_sharded` measured (identical on every rank).

    Attributes:
        stats: coherence statistics of the summed Gram (sigma, lambda_1(S), max_i
            lambda_1(H_i), GGN sharpness, S) on the ``num_samples`` probe examples.
        ggn_sharpness: lambda_1(K)/m, the top eigenvalue of the mean GGN of the probe.
        sigma_full: the full-data sigma estimate when ``n`` > m (docs/theory.md §6), else None.
        n: the data-set size ``sigma_full`` refers to (m when not given).
        num_samples: m.
        gram: the summed block Gram K (m, R, m, R): float64 for a float64 model, else
            float32, like ``report.gram`` of :func:`~torch_coherence.measure_curvature` (its
            entries carry float32 rounding; the dynamics read their tolerance from its dtype).
        terms: per rank, the indices of the layer terms that rank contracted.
        seconds: wall time of this rank's call.
    """

    stats: CoherenceStats
    ggn_sharpness: float
    sigma_full: float | None
    n: int
    num_samples: int
    gram: torch.Tensor
    terms: tuple[tuple[int, ...], ...]
    seconds: float


def _covered_params(mod: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters (by name relative to ``mod``) a registered layer rule covers in ``mod``.

    Mirrors the engine's own split (:func:`torch_coherence.curvature.gram.gram_factors`): a
    module is covered when ``find_rule(mod) is not None`` and it holds no parameters besides
    ``weight``/``bias`` (or those the rule's ``params(mod)`` names).
    """
    rule = find_rule(mod)
    if rule is None:
        return {}
    if hasattr(rule, "params"):
        return dict(rule.params(mod))
    direct = dict(mod.named_parameters(recurse=False))
    if set(direct) - {"weight", "bias"}:
        return {}
    return direct


def _selected(model: nn.Module, params: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The parameters to measure by name; raise for any outside a covered layer."""
    named = dict(model.named_parameters())
    if params is None:
        wanted = [k for k, p in named.items() if p.requires_grad]
    else:
        wanted = list(params)
        missing = [k for k in wanted if k not in named]
        if missing:
            raise ValueError(f"params: {missing} are not parameter names of the model")
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    ok: set[str] = set()
    for prefix, mod in model.named_modules():
        for k, p in _covered_params(mod).items():
            if owners[id(p)] == 1:
                ok.add(f"{prefix}.{k}" if prefix else k)
    bad = [k for k in wanted if k not in ok]
    if bad:
        raise ValueError(
            f"model: parameters {bad[:8]} are not in layers the engine's layer rules cover "
            "(nn.Linear, nn.Conv1d/2d, nn.Embedding, affine norms, nn.MultiheadAttention), so "
            "their Gram terms cannot be split over ranks; pass params= with covered layers only, "
            "and apply fully_shard to the blocks that contain the layers rather than to a layer "
            "itself"
        )
    if not wanted:
        raise ValueError("params: nothing to measure (no trainable parameter selected)")
    return {k: named[k] for k in wanted}


def _term_costs(facs: GramFactors) -> list[float]:
    """Flop estimates of the terms of K, ghost terms first, then the rows, in the factors' order.

    A block already summed into ``facs.dense`` is not a term (the engine does so only when
    streaming, which the sharded path does not ask for); it is refused rather than dropped.
    """
    if facs.dense is not None:
        raise RuntimeError("the engine returned a summed Gram block, which cannot be dealt out")
    m, R = facs.m, facs.R
    costs = []
    for g in facs.ghosts:
        T, o = g.d.shape[2], g.d.shape[3]
        k = 1 if g.index else g.a.shape[2]
        costs.append(float(m * m * (R * R * T * T * o + T * T * k)))
    costs += [float(m * m * R * R * rows.shape[2]) for rows in facs.rows]
    return costs


def deal_terms(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Deal terms to ranks: largest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same table. A rank may get no term (when there
    are fewer terms than ranks); it still takes part in the passes and the all-reduce.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    load = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[rank].append(i)
        load[rank] += costs[i]
    return [sorted(x) for x in out]


def _subset(facs: GramFactors, picked: Sequence[int]) -> GramFactors:
    """The factors of the chosen terms only (no copies)."""
    part = GramFactors(m=facs.m, R=facs.R, notes=facs.notes)
    n_ghost = len(facs.ghosts)
    part.ghosts.extend(facs.ghosts[i] for i in picked if i < n_ghost)
    for i in picked:
        if i >= n_ghost:
            part.rows.append(facs.rows[i - n_ghost])
            part.row_labels.append(facs.row_labels[i - n_ghost])
    return part


def _is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is an FSDP2 shard (a ``DTensor``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - DTensor is part of every supported torch
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _reshard(model: nn.Module) -> None:
    """Return every FSDP2 unit to its sharded state, as it is between training steps."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - FSDP2 is part of every supported torch
        return
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def _check_same_batch(inputs: Any, targets: Any, group: Any) -> None:
    """Raise on every rank when the ranks were given different probe batches."""
    total = 0.0
    for t in (inputs, targets):
        if isinstance(t, torch.Tensor):
            v = t.detach().double()
            total += float(v.sum()) + 1e-3 * float((v * v).sum())
    both = torch.tensor([total, -total], dtype=torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not math.isclose(float(both[0]), -float(both[1]), rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(
            "inputs/targets: the ranks passed different probe batches (checksums "
            f"{-float(both[1])!r} .. {float(both[0])!r}); pass the same examples on every rank"
        )


def measure_curvature_sharded(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss: Any,
    *,
    group: Any = None,
    n: int | None = None,
    params: Sequence[str] | None = None,
    eig_method: str = "auto",
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> ShardedCurvature:
    """Coherence and GGN sharpness of a (sharded) model, the Gram's terms split over ranks.

    Call it on every rank of ``group`` with the same probe batch, between optimizer steps.
    Every rank runs the engine's recording passes (:func:`.curvature.gram.gram_factors`) over
    all measured layers, contracts the layer terms :func:`deal_terms` gives it, and one
    ``all_reduce`` sums them (module docstring). Parameters, buffers, ``.grad``, RNG states
    and modes are restored exactly (:func:`torch_coherence._state.preserved_state`), so
    training is unaffected. The numbers equal :func:`torch_coherence.measure_curvature` on
    the unsharded model up to float64 summation order.

    Args:
        model: the module as wrapped for training (``fully_shard`` applied to its blocks,
            or a plain replica as under DDP: pass ``ddp_model.module``).
        inputs, targets, loss: the probe batch and the training loss, as for
            :func:`torch_coherence.measure_curvature` (exact factors; identical on every rank).
        group: the process group (default: the world).
        n: training-set size; when n > m the result carries ``sigma_full``.
        params: parameter names to measure (default: all trainable ones, which must all be
            in covered layers).
        eig_method: eigen-solver for lambda_1(S) and lambda_1(K).
        forward_fn: ``forward_fn(model, inputs) -> outputs`` for non-tensor batches.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: different batches on different ranks, parameters outside covered
            layers, fewer than 2 probe samples.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("measure_curvature_sharded needs an initialised torch.distributed")
    start = time.perf_counter()
    check_loss(loss)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sel = _selected(model, params)
    sharded = _is_sharded(model)
    _check_same_batch(inputs, targets, group)
    with preserved_state(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in sel.values():
            p.requires_grad_(True)
        with torch.no_grad():
            out = Forward(model, forward_fn)(inputs)
        m = out.shape[0]
        if m < 2:
            raise ValueError(f"inputs: the probe needs at least 2 samples, got {m}")
        sqrt = output_curvature(loss, out, targets).sqrt
        # FSDP2 keeps the root's parameters unsharded after a forward pass, registered as new
        # tensors: the engine finds layers by the tensors registered now.
        live = dict(model.named_parameters())
        facs = gram_factors(
            model,
            inputs,
            sqrt,
            {k: live[k] for k in sel},
            forward_fn=forward_fn,
            check=0 if sharded else 2,
        )
        dealt = deal_terms(_term_costs(facs), world)
        gram = _subset(facs, dealt[rank]).full().contiguous()
        del facs
        _reshard(model)
    dist.all_reduce(gram, group=group)
    stats = _gram_stats(gram, out.dtype, eig_method)
    if out.dtype != torch.float64:  # carries float32 rounding: typed so, as the engine's
        gram = gram.to(torch.float32)
    return ShardedCurvature(
        stats=stats,
        ggn_sharpness=float(stats.sharpness),
        sigma_full=_sigma_full(stats, n) if n is not None and n > m else None,
        n=m if n is None else int(n),
        num_samples=m,
        gram=gram,
        terms=tuple(tuple(x) for x in dealt),
        seconds=time.perf_counter() - start,
    )
