r"""The per-sample Gauss-Newton block Gram K_{ir,js} = A_{ir} \cdot A_{js} without per-sample
gradients where a layer allows it.

Given square roots :math:`B_i` (m, C, R) of the output Hessians, row r of sample i's factor is
:math:`A_{ir} = J_i^\top b_{ir}` — the gradient of :math:`b_{ir}^\top f_i` (b detached).
One forward pass records every covered layer's input; R backward passes of
:math:`\sum_i b_{ir}^\top f_i` give the layer output gradients :math:`\delta_{ir}` (per sample,
because in eval mode sample i's output depends only on sample i). K is additive over parameter
blocks (MATH.md §3):

* covered layers (:mod:`.rules`): the ghost rule
  :math:`\sum_{t,u} (\delta_{ir,t}\cdot\delta_{js,u})(a_{i,t}\cdot a_{j,u})`, or, when
  cheaper (long t axes), the materialised per-sample gradient
  :math:`\sum_t \delta_{ir,t} a_{i,t}^\top`. Cost per pair of rows: ghost
  :math:`T^2(o + k/R^2 + 1)`, materialised :math:`o\,k` (o, k output / input widths).
* every other trainable parameter: per-sample rows by ``torch.func`` (``functional_call`` +
  ``vmap`` over samples of ``vjp``, ``vmap`` over the R cotangents), ``chunk_size`` samples at a
  time.

Assumption of the layer rules: a covered module's weight and bias enter the model only
through that module's own ``forward`` (calls are recorded by a forward hook; several calls are
concatenated along t). Parameters shared between modules go to the fallback, and module
subclasses (e.g. the ``out_proj`` of ``nn.MultiheadAttention``, whose weight is used outside
its forward) are not covered. A weight that is *also* read directly by other code (manual
weight tying such as ``F.linear(h, self.emb.weight)``) is not detected: pass such models with
``params`` excluding it, or expect a wrong Gram for that parameter.

The result is a :class:`GramFactors` object: :meth:`GramFactors.block` gives any block
:math:`K_{IJ}` (so a large K is never formed: S and the diagonal blocks are assembled chunk
by chunk) and :meth:`GramFactors.matvec` multiplies by K through the factor structure (for
Lanczos on :math:`\lambda_1(K)`), e.g. for a ghost layer
:math:`(Kv)_{ir} = \sum_t \delta_{ir,t}^\top M a_{i,t}` with
:math:`M = \sum_{js,u} v_{js}\, \delta_{js,u} a_{j,u}^\top`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from .losses.factor import column, sample_block
from .rules import RULES, output_positions


class Forward(nn.Module):
    """``forward_fn(model, batch)`` (or ``model(batch)``) as a module, outputs flattened (m, C)."""

    def __init__(self, model: nn.Module, forward_fn: Callable[[nn.Module, Any], Any] | None):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch: Any) -> torch.Tensor:
        out = self.model(batch) if self.forward_fn is None else self.forward_fn(self.model, batch)
        return out


@dataclass
class _Ghost:
    a: torch.Tensor  # (m, T, k) float64, or (m, T) ids
    d: torch.Tensor  # (m, R, T, o) float64
    index: bool


@dataclass
class GramFactors:
    """Factor structure of K for m samples with R rows each (see module docstring)."""

    m: int
    R: int
    ghosts: list[_Ghost] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # each (m, R, P) float64
    dense: torch.Tensor | None = None  # (m, R, m, R): layers already summed into K

    def extend(self, part: GramFactors) -> None:
        """Take over ``part``'s factors."""
        self.ghosts += part.ghosts
        self.rows += part.rows
        if part.dense is not None:
            self.absorb(GramFactors(m=self.m, R=self.R, dense=part.dense))

    def absorb(self, part: GramFactors) -> None:
        """Add ``part``'s whole Gram to :attr:`dense` (its factors can then be freed)."""
        K = part.full()
        self.dense = K if self.dense is None else self.dense.add_(K)

    def block(self, I: slice, J: slice) -> torch.Tensor:  # noqa: E741
        """K_{IJ} of shape (|I|, R, |J|, R), float64."""
        R = self.R
        ni = len(range(self.m)[I])
        nj = len(range(self.m)[J])
        K = None
        for g in self.ghosts:
            dI, dJ = g.d[I], g.d[J]
            aI, aJ = g.a[I], g.a[J]
            T = dI.shape[2]
            if T == 1 and not g.index:
                dd = (dI.reshape(ni * R, -1) @ dJ.reshape(nj * R, -1).T).view(ni, R, nj, R)
                aa = aI[:, 0] @ aJ[:, 0].T
                if K is None:
                    K = dd.mul_(aa.view(ni, 1, nj, 1))
                else:
                    K.addcmul_(dd, aa.view(ni, 1, nj, 1))
                continue
            else:
                if g.index:
                    aa = (aI.view(ni, -1, 1, 1) == aJ.view(1, 1, nj, -1)) & (
                        aI.view(ni, -1, 1, 1) >= 0
                    )
                    aa = aa.to(dI.dtype)
                else:
                    aa = torch.einsum("itk,juk->itju", aI, aJ)
                dd = torch.einsum("irto,jsuo->irtjsu", dI, dJ)
                part = torch.einsum("irtjsu,itju->irjs", dd, aa)
            K = part if K is None else K + part
        for rows in self.rows:
            part = (rows[I].reshape(ni * R, -1) @ rows[J].reshape(nj * R, -1).T).view(ni, R, nj, R)
            K = part if K is None else K.add_(part)
        if self.dense is not None:
            part = self.dense[I, :, J, :]
            K = part.clone() if K is None else K.add_(part)
        if K is None:
            return torch.zeros(ni, R, nj, R, dtype=torch.float64)
        return K

    def full(self) -> torch.Tensor:
        """All of K, (m, R, m, R)."""
        return self.block(slice(None), slice(None))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """K v for v of length m R (flattened (m, R))."""
        v = v.reshape(self.m, self.R).to(torch.float64)
        out = torch.zeros_like(v)
        for g in self.ghosts:
            if g.index:
                rows = (g.d * v.view(self.m, self.R, 1, 1)).sum(1)  # (m, T, o)
                ids = g.a.reshape(-1)
                ok = ids >= 0
                M = torch.zeros(
                    int(ids.max()) + 1 if ok.any() else 1, rows.shape[-1], dtype=v.dtype
                )
                M.index_add_(0, ids[ok], rows.reshape(-1, rows.shape[-1])[ok])
                gathered = M[ids.clamp_min(0)] * ok.unsqueeze(1).to(v.dtype)
                gathered = gathered.view(self.m, -1, rows.shape[-1])  # (m, T, o)
                out += torch.einsum("irto,ito->ir", g.d, gathered)
            else:
                W = torch.einsum("jsuo,js->juo", g.d, v)  # (m, T, o)
                M = W.reshape(-1, W.shape[-1]).T @ g.a.reshape(-1, g.a.shape[-1])  # (o, k)
                Y = g.a @ M.T  # (m, T, o)
                out += torch.einsum("irto,ito->ir", g.d, Y)
        for rows in self.rows:
            out += torch.einsum("irp,p->ir", rows, torch.einsum("jsp,js->p", rows, v))
        if self.dense is not None:
            out += torch.einsum("irjs,js->ir", self.dense, v)
        return out.reshape(-1)

    def split(self, r: int) -> tuple[GramFactors, GramFactors]:
        """Factors of the first r rows and of the remaining rows (no copies)."""
        head, tail = GramFactors(m=self.m, R=r), GramFactors(m=self.m, R=self.R - r)
        for g in self.ghosts:
            head.ghosts.append(_Ghost(a=g.a, d=g.d[:, :r], index=g.index))
            tail.ghosts.append(_Ghost(a=g.a, d=g.d[:, r:], index=g.index))
        for rows in self.rows:
            head.rows.append(rows[:, :r])
            tail.rows.append(rows[:, r:])
        if self.dense is not None:
            head.dense = self.dense[:, :r, :, :r]
            tail.dense = self.dense[:, r:, :, r:]
        return head, tail

    def diag_blocks(self, chunk: int) -> torch.Tensor:
        """K_ii for all i, (m, R, R)."""
        outs = []
        for s in range(0, self.m, chunk):
            sl = slice(s, min(s + chunk, self.m))
            blk = self.block(sl, sl)
            idx = torch.arange(blk.shape[0])
            outs.append(blk[idx, :, idx, :])
        return torch.cat(outs)


def _split_params(
    fwd: Forward, selected: dict[str, torch.Tensor]
) -> tuple[dict[nn.Module, tuple[bool, bool]], dict[str, torch.Tensor]]:
    """Covered modules (with which of weight / bias are selected) and fallback parameters."""
    owners: dict[int, list[nn.Module]] = {}
    for mod in fwd.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod)
    covered: dict[nn.Module, tuple[bool, bool]] = {}
    fallback: dict[str, torch.Tensor] = {}
    taken: set[int] = set()
    for mod in fwd.modules():
        if type(mod) not in RULES:
            continue
        direct = dict(mod.named_parameters(recurse=False))
        if set(direct) - {"weight", "bias"}:
            continue
        sel = {k: p for k, p in direct.items() if any(p is q for q in selected.values())}
        if not sel or any(len(owners[id(p)]) > 1 for p in sel.values()):
            continue
        covered[mod] = ("weight" in sel, "bias" in sel)
        taken.update(id(p) for p in sel.values())
    for name, p in selected.items():
        if id(p) not in taken:
            fallback[name] = p
    return covered, fallback


def _ghost_cheaper(T: int, k: int, o: int, R: int) -> bool:
    return T == 1 or T * T * (o + k / (R * R) + 1) <= o * k


def gram_factors(
    model: nn.Module,
    inputs: Any,
    sqrt: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    chunk_size: int | None = None,
    outputs_check: Callable[[torch.Tensor], None] | None = None,
    force: str | None = None,
    accumulate: bool = False,
    sink: Callable[[GramFactors], None] | None = None,
) -> GramFactors:
    """Factor structure of K for cotangents ``sqrt`` (m, C, R).

    Args:
        model: the model (already in eval mode).
        inputs: the probe batch (tensor, or anything ``forward_fn`` takes).
        sqrt: (m, C, R) square roots of the output Hessians (float64): a tensor, or a
            lazy factor whose columns are built one at a time (:mod:`.losses.factor`).
        params: the selected trainable parameters by name as in ``model.named_parameters()``.
        forward_fn: ``forward_fn(model, inputs) -> outputs`` for non-tensor batches.
        chunk_size: samples per ``vmap`` call of the fallback (default 32).
        outputs_check: called with the (m, C) outputs of the recording forward pass.
        force: ``"ghost"``, ``"materialise"`` or ``"fallback"`` to force one assembly path for
            all covered layers (testing); default chooses per layer by cost.
        accumulate: stream K: sum each layer's Gram into ``GramFactors.dense`` as soon as
            its factors exist and free them, and compute the fallback rows in parameter
            groups of at most :data:`FALLBACK_GROUP_BYTES` (peak memory: the largest layer's
            factors plus the (m R)^2 Gram, instead of every layer's factors at once).
        sink: receives each layer's (and fallback group's) factors as a
            :class:`GramFactors` of their own instead of the result (e.g.
            :class:`SketchSink`, which projects them before the next layer is built);
            the returned factors are then empty.
    """
    fwd = Forward(model, forward_fn)
    m, _C, R = sqrt.shape
    selected = {"model." + k: v for k, v in params.items()}
    covered, fallback = _split_params(fwd, selected)
    if force == "fallback":
        fallback, covered = dict(selected), {}
    facs = GramFactors(m=m, R=R)
    consume = sink or (facs.absorb if accumulate else facs.extend)
    chunk = chunk_size or 32
    records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        records.setdefault(mod, []).append((args[0].detach(), out))

    handles = [mod.register_forward_hook(hook) for mod in covered]
    try:
        with torch.enable_grad():
            out = fwd(inputs)
    finally:
        for h in handles:
            h.remove()
    flat = out.reshape(m, -1)
    if outputs_check is not None:
        outputs_check(flat)
    if covered:
        mods = [mod for mod in covered if mod in records]
        outs = [o for mod in mods for _, o in records[mod]]
        grads: list[list[torch.Tensor]] = [[] for _ in outs]
        for r in range(R):
            cot = column(sqrt, r).to(out.dtype).reshape(out.shape)
            gs = torch.autograd.grad(out, outs, cot, retain_graph=True, allow_unused=True)
            for lst, o, g in zip(grads, outs, gs, strict=False):
                lst.append(torch.zeros_like(o) if g is None else g)
        k = 0
        for mod in mods:
            w, b = covered[mod]
            a_parts, d_parts = [], []
            for x, _ in records[mod]:
                gin = RULES[type(mod)](mod, x, w, b)
                if gin is None:
                    raise RuntimeError("rule declined a covered module")
                a_parts.append(gin.a if gin.index else gin.a.double())
                d_parts.append(output_positions(mod, torch.stack(grads[k])).double())
                grads[k] = []  # free this call's output gradients
                k += 1
            a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 1)
            d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, 2)
            index = a.dtype == torch.long
            T, o_dim = d.shape[2], d.shape[3]
            k_dim = a.shape[2] if not index else 1
            ghost = (
                force == "ghost"
                or index
                or (force != "materialise" and _ghost_cheaper(T, k_dim, o_dim, R))
            )
            part = GramFactors(m=m, R=R)
            if ghost:
                part.ghosts.append(_Ghost(a=a, d=d, index=index))
            elif accumulate and m * R * o_dim * k_dim * 8 > ROW_BLOCK_BYTES:
                part.dense = _blocked_rows_gram(d, a)
            else:
                dt = d.transpose(2, 3).reshape(m, R * o_dim, T)
                part.rows.append(torch.bmm(dt, a).reshape(m, R, -1))
            del a, d, a_parts, d_parts
            records[mod] = []
            consume(part)
            del part
    records.clear()
    groups = _groups(fallback, m * R * 8) if accumulate or sink else [fallback]
    for group in groups:
        if group:
            if accumulate and sink is None:  # rows stay in the model's dtype until the Gram
                rows = _fallback_rows(fwd, inputs, sqrt, group, chunk, keep_dtype=True)
                facs.absorb(GramFactors(m=m, R=R, dense=_stored_rows_gram(rows)))
                del rows
            else:
                consume(
                    GramFactors(m=m, R=R, rows=[_fallback_rows(fwd, inputs, sqrt, group, chunk)])
                )
    return facs


#: Bytes of one layer's materialised per-sample rows held at once when the Gram is streamed;
#: a larger layer's Gram is built from sample blocks of its rows (recomputed per block pair).
ROW_BLOCK_BYTES = 256 * 2**20


def _blockwise_gram(rows: Callable[[slice], torch.Tensor], m: int, R: int, P: int) -> torch.Tensor:
    """K (m, R, m, R) from float64 rows (n R, P) of sample blocks, ``rows(block)`` each."""
    n = max(1, ROW_BLOCK_BYTES // (2 * R * P * 8))
    K = torch.empty(m, R, m, R, dtype=torch.float64)
    for s in range(0, m, n):
        I = slice(s, min(s + n, m))  # noqa: E741
        rI = rows(I)
        for t in range(s, m, n):
            J = slice(t, min(t + n, m))
            blk = (rI @ (rI if t == s else rows(J)).T).view(I.stop - I.start, R, -1, R)
            K[I, :, J, :] = blk
            K[J, :, I, :] = blk.permute(2, 3, 0, 1)
    return K


def _blocked_rows_gram(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One layer's K (m, R, m, R) from rows sum_t d_t a_t^T built a sample block at a time."""
    m, R, T, o = d.shape
    P = o * a.shape[2]

    def rows(sl: slice) -> torch.Tensor:
        dt = d[sl].transpose(2, 3).reshape(-1, R * o, T)
        return torch.bmm(dt, a[sl]).reshape(-1, P)

    return _blockwise_gram(rows, m, R, P)


def _stored_rows_gram(rows: torch.Tensor) -> torch.Tensor:
    """K (m, R, m, R) in float64 from rows (m, R, P) kept in the model's dtype (upcast by
    sample blocks: the same numbers as converting them whole, at a fraction of the memory)."""
    m, R, P = rows.shape
    return _blockwise_gram(lambda sl: rows[sl].double().reshape(-1, P), m, R, P)


#: Bytes of fallback rows computed at once when the Gram is streamed (several parameters
#: share one ``torch.func`` pass up to this size; a larger parameter gets a pass of its own).
FALLBACK_GROUP_BYTES = 256 * 2**20


def _groups(params: dict[str, torch.Tensor], bytes_per_entry: int) -> list[dict[str, torch.Tensor]]:
    """Split parameters into groups whose rows take at most FALLBACK_GROUP_BYTES each."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, p in sorted(params.items(), key=lambda kv: kv[1].numel()):
        b = p.numel() * bytes_per_entry
        if groups[-1] and size + b > FALLBACK_GROUP_BYTES:
            groups.append({})
            size = 0
        groups[-1][name] = p
        size += b
    return groups


def _fallback_rows(
    fwd: Forward,
    inputs: Any,
    sqrt: torch.Tensor,
    fallback: dict[str, torch.Tensor],
    chunk: int,
    keep_dtype: bool = False,
) -> torch.Tensor:
    """Per-sample rows J_i^T b_ir for the fallback parameters, (m, R, P) float64 (in the
    model's dtype with ``keep_dtype``)."""
    m, C, R = sqrt.shape
    if not isinstance(sqrt, torch.Tensor):  # a lazy factor: dense chunks of n C R doubles
        chunk = max(1, min(chunk, FALLBACK_GROUP_BYTES // (C * R * 8)))
    names = list(fallback)
    pvals = {k: fallback[k].detach() for k in names}

    def one(p: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        xb = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)
        return functional_call(fwd, p, (xb,), strict=False).reshape(-1)

    def sample_rows(x: Any, b: torch.Tensor) -> dict[str, torch.Tensor]:
        out, pull = vjp(lambda p: one(p, x), pvals)
        return vmap(pull)(b.T.to(out.dtype))[0]

    batched = vmap(sample_rows)
    out: torch.Tensor | None = None  # (m, R, P), filled chunk by chunk (no second copy)
    for s in range(0, m, chunk):
        sl = slice(s, min(s + chunk, m))
        xs = tree_map(lambda t, sl=sl: t[sl] if isinstance(t, torch.Tensor) else t, inputs)
        g = batched(xs, sample_block(sqrt, sl))
        if out is None:
            P = sum(g[k][0, 0].numel() for k in names)
            dtype = g[names[0]].dtype if keep_dtype else torch.float64
            out = torch.empty(m, R, P, dtype=dtype, device=g[names[0]].device)
        col = 0
        for k in names:
            part = g[k].detach().reshape(g[k].shape[0], R, -1)
            out[sl, :, col : col + part.shape[2]] = part
            col += part.shape[2]
        del g
    assert out is not None
    return out


def flat_params(params: Sequence[torch.Tensor]) -> int:
    """Total number of entries."""
    return sum(p.numel() for p in params)


def sketch(facs: GramFactors, k: int, generator: torch.Generator, chunk: int = 64) -> GramFactors:
    r"""Randomized Gram: rows :math:`A_{ir}\Omega` with Gaussian :math:`\Omega` (d, k) / sqrt(k).

    :math:`E[\Omega\Omega^\top] = I`, so :math:`\hat K = (A\Omega)(A\Omega)^\top` is unbiased for
    K, with :math:`\mathrm{Var}\,\hat K_{ab} = (K_{aa}K_{bb} + K_{ab}^2)/k`: relative error
    :math:`O(1/\sqrt k)` (Johnson-Lindenstrauss; Halko, Martinsson & Tropp 2011). Per-sample
    gradients are never formed: a ghost layer's projection is
    :math:`\sum_t \delta_{ir,t}^\top \Omega_l\, a_{i,t}` (chunked over samples).
    """
    m, R = facs.m, facs.R
    Z = torch.zeros(m, R, k, dtype=torch.float64)
    scale = 1.0 / k**0.5
    for g in facs.ghosts:
        o = g.d.shape[-1]
        if g.index:
            vocab = int(g.a.max()) + 1 if (g.a >= 0).any() else 1
            om = torch.randn(vocab, o, k, generator=generator, dtype=torch.float64) * scale
        else:
            om = torch.randn(o, g.a.shape[-1], k, generator=generator, dtype=torch.float64) * scale
        for s in range(0, m, chunk):
            sl = slice(s, min(s + chunk, m))
            if g.index:
                ids = g.a[sl]
                Y = om[ids.clamp_min(0)] * (ids >= 0).view(*ids.shape, 1, 1).to(om.dtype)
            else:
                Y = torch.einsum("itc,ocq->itoq", g.a[sl], om)
            Z[sl] += torch.einsum("irto,itoq->irq", g.d[sl], Y)
    for rows in facs.rows:
        om = torch.randn(rows.shape[-1], k, generator=generator, dtype=torch.float64) * scale
        Z += rows @ om
    return GramFactors(m=m, R=R, rows=[Z])


class SketchSink:
    r"""Projects each layer's factors as soon as they exist (``gram_factors(sink=...)``).

    Rows ``[:rows]`` go through :func:`sketch` layer by layer into one (m, rows, k) tensor
    (independent Gaussian :math:`\Omega_l` per layer, the same distribution as sketching the
    whole factor at once), so no layer's per-sample rows outlive their layer; rows
    ``[rows:]`` (the per-sample gradients) are kept exact. :meth:`result` gives both parts.
    """

    def __init__(self, m: int, rows: int, k: int, generator: torch.Generator) -> None:
        self.k, self.generator = k, generator
        self.Z = torch.zeros(m, rows, k, dtype=torch.float64)
        self.tail: GramFactors | None = None
        self.rows = rows

    def __call__(self, part: GramFactors) -> None:
        head, tail = part.split(self.rows)
        self.Z += sketch(head, self.k, self.generator).rows[0]
        keep = GramFactors(m=part.m, R=tail.R)
        keep.ghosts = [_Ghost(a=g.a, d=g.d.clone(), index=g.index) for g in tail.ghosts]
        keep.rows = [r.clone() for r in tail.rows]
        if self.tail is None:
            self.tail = keep
        else:
            self.tail.extend(keep)

    def result(self) -> tuple[GramFactors, GramFactors]:
        """(sketched factors of the first rows, exact factors of the rest)."""
        m = self.Z.shape[0]
        tail = self.tail if self.tail is not None else GramFactors(m=m, R=0)
        return GramFactors(m=m, R=self.rows, rows=[self.Z]), tail
