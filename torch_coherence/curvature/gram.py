r"""The per-sample Gauss-Newton block Gram K_{ir,js} = A_{ir} \cdot A_{js} without per-sample
gradients where a layer allows it.

Given square roots :math:`B_i` (m, C, R) of the output Hessians, row r of sample i's factor is
:math:`A_{ir} = J_i^\top b_{ir}` — the gradient of :math:`b_{ir}^\top f_i` (b detached).
One forward pass records every covered layer's input; R backward passes of
:math:`\sum_i b_{ir}^\top f_i` give the layer output gradients :math:`\delta_{ir}` (per sample,
because in eval mode sample i's output depends only on sample i). K is additive over parameter
blocks (``docs/theory.md`` §3):

* covered modules (a registered rule of :mod:`.layers` supports them, decided before any pass):
  the ghost rule :math:`\sum_{t,u} (\delta_{ir,t}\cdot\delta_{js,u})(a_{i,t}\cdot a_{j,u})`,
  or, when cheaper (long t axes), the materialised per-sample gradient
  :math:`\sum_t \delta_{ir,t} a_{i,t}^\top`. Cost per pair of rows: ghost
  :math:`T^2(o + k/R^2 + 1)`, materialised :math:`o\,k` (o, k output / input widths).
* every other trainable parameter: per-sample rows by ``torch.func`` (``functional_call`` +
  ``vmap`` over samples of ``vjp``, ``vmap`` over the R cotangents), ``chunk_size`` samples at a
  time; one sample at a time where the model cannot be vmapped over samples.

Precision and memory. Factors (inputs a, output gradients delta, materialised rows) stay in
the model's dtype and their products are taken in it; K is summed over blocks in float64 and
made exactly symmetric, and every eigenproblem after it runs in float64. For a float32 model
that is the rounding the model's own gradients carry: on the case table
(``tests/curvature/test_cases.py``) K stays within 2e-5 of the float64 jacrev reference.
The R output gradients of a call are written into one (m, R, ...) buffer per call (no
per-row list and stack). A ghost block is contracted as :math:`X_{ij} = A_iA_j^\top`,
:math:`Y_{ij} = X_{ij}D_j`, :math:`K_{ir,js} = \langle D_{ir}, Y_{ij,s}\rangle` in sample
blocks of bounded size (:data:`GHOST_BLOCK_ELEMS`), never the :math:`(RT)^2` products of
output gradients. Streamed (``accumulate``), each layer's block is formed, checked and summed
into K before the next is built; rows of norm layers, and over :data:`GRAD_STORE_BYTES` of
output gradients those of materialised convolutions with o k < T o, are built from blocks of
rows as the backward passes deliver them, so those output gradients are never stored.

Assumptions of the layer rules and how each is enforced (a module that violates one goes to the
fallback, named with the reason in ``notes.fallback``):

* a covered weight enters the model only through its module's ``forward``: parameters
  registered in two modules are not covered, and a :class:`torch.overrides.TorchFunctionMode`
  watches the recording pass for any read of a covered parameter outside its module. The one
  exception is a rule with ``tied = True`` (``nn.Embedding``): its weight may be registered in
  other modules too, and each ``F.linear(x, weight)`` read outside it (weight tying, by an
  ``nn.Linear`` sharing the weight or a direct call) is recorded as one more call of the
  embedding, whose rule combines all its calls (``rule.combine``; :mod:`.layers.embedding`);
* the recorded tensors are the ones the model used: the forward hook hands the model a copy of
  the layer output (so ``ReLU(inplace=True)`` after it modifies the copy) and the layer input's
  version counter is compared after the pass (an in-place change afterwards is detected);
* the hooks see every call: ``torch.compile``d modules run eagerly (:func:`eager_modules`) and a
  covered module whose hooks never ran goes to the fallback;
* the first axis of a recorded input and output is the probe's sample axis.

Whatever no guard foresaw, the self-check (:mod:`.selfcheck`) catches: every block of K is
compared with plain autograd on random coefficient vectors, a wrong block is recomputed through
the fallback (``notes.rechecked``), and one that still disagrees raises.

The result is a :class:`GramFactors` object: :meth:`GramFactors.block` gives any block
:math:`K_{IJ}` (so a large K is never formed: S and the diagonal blocks are assembled chunk
by chunk) and :meth:`GramFactors.matvec` multiplies by K through the factor structure (for
Lanczos on :math:`\lambda_1(K)`), e.g. for a ghost layer
:math:`(Kv)_{ir} = \sum_t \delta_{ir,t}^\top M a_{i,t}` with
:math:`M = \sum_{js,u} v_{js}\, \delta_{js,u} a_{j,u}^\top`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .layers import LayerRule, Piece, find_rule
from .losses.factor import column, sample_block


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
    a: torch.Tensor  # (m, T, k) in the model's dtype, or (m, T) ids
    d: torch.Tensor  # (m, R, T, o) in the model's dtype
    index: bool
    label: str = ""  # the module it belongs to
    ones: bool = False  # a bias: a constant 1 appended to every a_t (not stored)


#: Entries of the (samples, samples, T, R, o) intermediate of one ghost block product.
GHOST_BLOCK_ELEMS = 2**24


def _sym_gram(A: torch.Tensor, block: int = 128) -> torch.Tensor:
    """A A^T for A (n, P), computing only the blocks on and above the diagonal."""
    n = A.shape[0]
    if n <= 2 * block:
        return A @ A.T
    K = torch.empty(n, n, dtype=A.dtype, device=A.device)
    for s in range(0, n, block):
        blk = A[s : s + block] @ A[s:].T
        K[s : s + block, s:] = blk
        K[s + block :, s : s + block] = blk[:, block:].T
    return K


def _rows_gram(rows: torch.Tensor, I: slice, J: slice) -> torch.Tensor:  # noqa: E741
    """The (|I|, R, |J|, R) block of the Gram of rows (m, R, P), in their dtype."""
    rI = rows[I]
    ni, R = rI.shape[:2]
    if I == J:
        return _sym_gram(rI.reshape(ni * R, -1)).view(ni, R, ni, R)
    rJ = rows[J]
    return (rI.reshape(ni * R, -1) @ rJ.reshape(-1, rJ.shape[2]).T).view(ni, R, -1, R)


def _ghost_pair(
    dI: torch.Tensor, aI: torch.Tensor, dJ: torch.Tensor, aJ: torch.Tensor, g: _Ghost
) -> torch.Tensor:
    r"""Ghost block :math:`\sum_{t,u} (\delta_{ir,t}\cdot\delta_{js,u})(a_{i,t}\cdot a_{j,u})`.

    Contracted as :math:`X_{ij} = A_i A_j^\top` (T x T), :math:`Y_{ij} = X_{ij} D_j`
    (T x R o), :math:`K_{ir,js} = \langle D_{ir}, Y_{ij,s}\rangle`: per pair of samples
    :math:`T^2 k + T^2 R o + R^2 T o` multiply-adds, never the :math:`(RT)^2` products of
    output gradients.
    """
    ni, R, T, o = dI.shape
    nj = dJ.shape[0]
    if g.index:
        aa = (aI.view(ni, T, 1, 1) == aJ.view(1, 1, nj, T)) & (aI.view(ni, T, 1, 1) >= 0)
        aa = aa.to(dI.dtype)
    else:
        aa = (aI.reshape(ni * T, -1) @ aJ.reshape(nj * T, -1).T).view(ni, T, nj, T)
        if g.ones:
            aa += 1
    if T == 1:
        if dI is dJ:
            dd = _sym_gram(dI.reshape(ni * R, o)).view(ni, R, nj, R)
        else:
            dd = (dI.reshape(ni * R, o) @ dJ.reshape(nj * R, o).T).view(ni, R, nj, R)
        return dd.mul_(aa.view(ni, 1, nj, 1))
    lhs = aa.permute(2, 0, 1, 3).reshape(nj, ni * T, T)
    rhs = dJ.permute(0, 2, 1, 3).reshape(nj, T, R * o)
    Y = torch.bmm(lhs, rhs).view(nj, ni, T, R, o).permute(1, 2, 4, 0, 3).reshape(ni, T * o, -1)
    return torch.bmm(dI.reshape(ni, R, T * o), Y).view(ni, R, nj, R)


def _ghost_gram(g: _Ghost, I: slice, J: slice) -> torch.Tensor:  # noqa: E741
    """The (|I|, R, |J|, R) block of a ghost layer's Gram, in sample blocks whose intermediate
    holds at most :data:`GHOST_BLOCK_ELEMS` entries (only blocks on and above the diagonal
    when I == J)."""
    dI, dJ, aI, aJ = g.d[I], g.d[J], g.a[I], g.a[J]
    ni, R, T, o = dI.shape
    nj = dJ.shape[0]
    step = max(1, int((GHOST_BLOCK_ELEMS / (T * max(R, 1) * o)) ** 0.5))
    if ni <= step and nj <= step:
        if I == J:
            return _ghost_pair(dI, aI, dI, aI, g)
        return _ghost_pair(dI, aI, dJ, aJ, g)
    out = torch.empty(ni, R, nj, R, dtype=dI.dtype, device=dI.device)
    sym = I == J
    for s in range(0, ni, step):
        si = slice(s, s + step)
        for t in range(s if sym else 0, nj, step):
            tj = slice(t, t + step)
            blk = _ghost_pair(dI[si], aI[si], dJ[tj], aJ[tj], g)
            out[si, :, tj] = blk
            if sym and t != s:
                out[tj, :, si] = blk.permute(2, 3, 0, 1)
    return out


@dataclass
class EngineNotes:
    """How K was assembled and how well it agreed with autograd.

    Attributes:
        fallback: parameter or module name -> why it went to the ``torch.func`` fallback
            before the check (no rule, parameter read outside its module, ...).
        rechecked: blocks the self-check found wrong and recomputed through the fallback,
            with their relative error before.
        check_error: largest relative error of any block after corrections (nan: no check).
        check_passes: backward passes the self-check used.
    """

    fallback: dict[str, str] = field(default_factory=dict)
    rechecked: dict[str, float] = field(default_factory=dict)
    check_error: float = float("nan")
    check_passes: int = 0


@dataclass
class GramFactors:
    """Factor structure of K for m samples with R rows each (see module docstring)."""

    m: int
    R: int
    ghosts: list[_Ghost] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # each (m, R, P) float64
    row_labels: list[str] = field(default_factory=list)  # the block of each rows entry
    notes: EngineNotes = field(default_factory=EngineNotes)
    dense: torch.Tensor | None = None  # (m, R, m, R): blocks already summed into K
    dense_label: str = ""  # the block ``dense`` holds, when it holds one block only

    def extend(self, part: GramFactors) -> None:
        """Take over ``part``'s factors."""
        self.ghosts += part.ghosts
        self.rows += part.rows
        self.row_labels += part.row_labels
        if part.dense is not None:
            self.dense = part.dense if self.dense is None else self.dense.add_(part.dense)

    def absorb(self, part: GramFactors) -> None:
        """Add ``part``'s whole Gram to :attr:`dense` (its factors can then be freed)."""
        only_dense = part.dense is not None and not part.ghosts and not part.rows
        K = part.dense if only_dense else part.full()
        self.dense = K if self.dense is None else self.dense.add_(K)

    def block(self, I: slice, J: slice) -> torch.Tensor:  # noqa: E741
        """K_{IJ} of shape (|I|, R, |J|, R), float64 (each term computed in its factors' dtype,
        summed in float64)."""
        R = self.R
        ni = len(range(self.m)[I])
        nj = len(range(self.m)[J])
        terms = (_ghost_gram(g, I, J) for g in self.ghosts)
        terms = itertools.chain(terms, (_rows_gram(rows, I, J) for rows in self.rows))
        K = None
        for term in terms:
            K = term.to(torch.float64, copy=True) if K is None else K.add_(term)
        if K is not None and I == J:  # products in the factors' dtype: made exactly symmetric
            Kf = K.view(ni * R, ni * R)
            K = torch.add(Kf, Kf.T).mul_(0.5).view(ni, R, ni, R)
        if self.dense is not None:
            K = self.dense[I, :, J, :].clone() if K is None else K.add_(self.dense[I, :, J, :])
        return torch.zeros(ni, R, nj, R, dtype=torch.float64) if K is None else K

    def full(self) -> torch.Tensor:
        """All of K, (m, R, m, R)."""
        return self.block(slice(None), slice(None))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """K v for v of length m R (flattened (m, R)); each term in its factors' dtype."""
        v = v.reshape(self.m, self.R).to(torch.float64)
        out = torch.zeros_like(v)
        for g in self.ghosts:
            vv = v.to(g.d.dtype)
            W = torch.einsum("jsuo,js->juo", g.d, vv)  # (m, T, o)
            if g.index:
                ids = g.a.reshape(-1)
                ok = ids >= 0
                M = W.new_zeros(int(ids.max()) + 1 if ok.any() else 1, W.shape[-1])
                M.index_add_(0, ids[ok], W.reshape(-1, W.shape[-1])[ok])
                Y = M[ids.clamp_min(0)] * ok.unsqueeze(1).to(W.dtype)
                Y = Y.view(W.shape)  # (m, T, o)
            else:
                M = W.reshape(-1, W.shape[-1]).T @ g.a.reshape(-1, g.a.shape[-1])  # (o, k)
                Y = g.a @ M.T  # (m, T, o)
                if g.ones:
                    Y += W.sum((0, 1))
            out += torch.einsum("irto,ito->ir", g.d, Y)
        for rows in self.rows:
            vv = v.to(rows.dtype)
            out += torch.einsum("irp,p->ir", rows, torch.einsum("jsp,js->p", rows, vv))
        if self.dense is not None:
            out += torch.einsum("irjs,js->ir", self.dense, v)
        return out.reshape(-1)

    def split(self, r: int) -> tuple[GramFactors, GramFactors]:
        """Factors of the first r rows and of the remaining rows (no copies)."""
        head, tail = GramFactors(m=self.m, R=r), GramFactors(m=self.m, R=self.R - r)
        head.notes = tail.notes = self.notes
        for g in self.ghosts:
            head.ghosts.append(_Ghost(g.a, g.d[:, :r], g.index, g.label, g.ones))
            tail.ghosts.append(_Ghost(g.a, g.d[:, r:], g.index, g.label, g.ones))
        for rows, label in zip(self.rows, self.row_labels, strict=True):
            head.rows.append(rows[:, :r])
            tail.rows.append(rows[:, r:])
            head.row_labels.append(label)
            tail.row_labels.append(label)
        if self.dense is not None:
            head.dense = self.dense[:, :r, :, :r]
            tail.dense = self.dense[:, r:, :, r:]
        return head, tail

    def replace(self, label: str, rows: torch.Tensor) -> None:
        """Drop every entry of block ``label`` and add ``rows`` (m, R, P) in its place."""
        if self.dense_label == label:
            self.dense = None
        self.ghosts = [g for g in self.ghosts if g.label != label]
        keep = [i for i, lab in enumerate(self.row_labels) if lab != label]
        self.rows = [self.rows[i] for i in keep] + [rows]
        self.row_labels = [self.row_labels[i] for i in keep] + [label]

    def diag_blocks(self, chunk: int) -> torch.Tensor:
        """K_ii for all i, (m, R, R)."""
        outs = []
        for s in range(0, self.m, chunk):
            sl = slice(s, min(s + chunk, self.m))
            blk = self.block(sl, sl)
            idx = torch.arange(blk.shape[0])
            outs.append(blk[idx, :, idx, :])
        return torch.cat(outs)


#: The engine's up-front guards against the layer rules' assumptions, each named after the
#: silent failure it prevents. Only tests switch them off, to show that the self-check
#: (:mod:`.selfcheck`) catches the same failure on its own.
SAFEGUARDS = {
    "copy_outputs": True,  # in-place ops after a layer (ReLU(inplace=True)) see a copy
    "watch_reads": True,  # parameters read outside their module (weight tying) -> fallback
    "unwrap_compiled": True,  # torch.compile'd modules run eagerly (hooks fire)
    "missing_calls": True,  # a covered module whose hooks never ran -> fallback
    "expand_shared": True,  # an embedding output without sample axis gets one (positions)
}


@contextlib.contextmanager
def eager_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every ``torch.compile``d submodule replaced by its eager module.

    A compiled module (``torch._dynamo`` ``OptimizedModule``) runs a graph in which module hooks
    do not fire and whose backward is not twice differentiable, so the probe runs the eager
    module it wraps (``_orig_mod``): the same parameters and the same function. The swap is
    undone on exit. Yields the eager root (``model`` itself unless it is compiled).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    def inner(mod: nn.Module) -> nn.Module:
        while isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        return mod

    if not SAFEGUARDS["unwrap_compiled"]:
        yield model
        return
    root = inner(model)
    swaps = []
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, OptimizedModule):
                swaps.append((parent, name, child))
                parent._modules[name] = inner(child)
    try:
        yield root
    finally:
        for parent, name, child in reversed(swaps):
            parent._modules[name] = child


@dataclass
class _Covered:
    rule: LayerRule
    weight: bool
    bias: bool
    names: list[str]  # the module's selected parameter names (fallback names)
    tensors: list[torch.Tensor]


def _split_params(
    fwd: Forward, selected: dict[str, torch.Tensor]
) -> tuple[dict[nn.Module, _Covered], dict[str, torch.Tensor]]:
    """Covered modules (a registered rule supports them) and the fallback parameters.

    Decided before any pass: a module is covered when its type has a rule whose
    ``supports(module)`` holds, it has no parameters besides ``weight``/``bias`` (or those the
    rule's ``params(module)`` names, all of them selected) and none of its selected parameters
    is registered in another module too.
    """
    ids = {id(p): k for k, p in selected.items()}
    owners: dict[int, int] = {}
    for mod in fwd.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    covered: dict[nn.Module, _Covered] = {}
    taken: set[int] = set()
    for mod in fwd.modules():
        rule = find_rule(mod)
        if rule is None:
            continue
        if hasattr(rule, "params"):
            sel = rule.params(mod)
            if any(id(p) not in ids or id(p) in taken for p in sel.values()):
                continue
            flags = (True, any(k.endswith("bias") for k in sel))
        else:
            direct = dict(mod.named_parameters(recurse=False))
            if set(direct) - {"weight", "bias"}:
                continue
            sel = {k: p for k, p in direct.items() if id(p) in ids}
            flags = ("weight" in sel, "bias" in sel)
        shared = any(owners[id(p)] > 1 for p in sel.values())
        if not sel or any(id(p) in taken for p in sel.values()):
            continue
        if shared and not getattr(rule, "tied", False):  # tied: see layers.embedding
            continue
        covered[mod] = _Covered(
            rule, *flags, [ids[id(p)] for p in sel.values()], list(sel.values())
        )
        taken.update(id(p) for p in sel.values())
    fallback = {k: p for k, p in selected.items() if id(p) not in taken}
    return covered, fallback


class _ReadWatch(TorchFunctionMode):
    r"""Flags covered parameters read by any torch function outside their own module's forward.

    The layer rules assume a covered weight enters the model only through its module (weight
    tying such as ``F.linear(h, emb.weight)`` breaks that); such modules go to the fallback.
    Property reads (``weight.shape``) are not uses.

    It also gives outputs without a sample axis their per-sample gradient: an ``nn.Embedding``
    called on ids without the sample axis (positional embeddings of ``torch.arange(T)``) has one
    output P (T, d) shared by all samples, added to a per-sample (m, T, d) tensor by
    broadcasting. That addition is run with P expanded to (m, T, d) explicitly (the same
    values), and the expanded tensor is recorded as the call's output (ids expanded alike), so
    its gradient is the per-sample :math:`\delta_i` and the Embedding rule applies.
    """

    ADD = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)

    def __init__(self, owners: dict[int, nn.Module], m: int) -> None:
        super().__init__()
        self.owners = owners
        self.m = m
        self.stack: list[nn.Module] = []
        self.leaked: set[nn.Module] = set()
        self.shared: dict[int, tuple[torch.Tensor, _Call]] = {}
        self.tied: set[nn.Module] = set()  # modules whose rule takes F.linear reads (tied)
        self.record: Callable | None = None  # record(module, tag, x, out) -> out for the model

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tied = self._tied_read(func, args)
        if getattr(func, "__name__", "") != "__get__":
            for t in tree_flatten((args, kwargs))[0]:
                if tied is not None and t is args[1]:
                    continue
                mod = self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None
                if mod is not None and (not self.stack or self.stack[-1] is not mod):
                    self.leaked.add(mod)
        if self.shared and func in self.ADD and len(args) == 2:
            args = tuple(self._expand_shared(args))
        if tied is not None:  # (x, W) of the call, recorded like a call of W's module
            return self.record(tied, "linear", args[0], func(*args, **kwargs))
        return func(*args, **kwargs)

    def _tied_read(self, func, args: tuple) -> nn.Module | None:
        """The module of a ``tied`` rule whose weight this ``F.linear(x, W)`` reads outside it."""
        if func is not torch._C._nn.linear or len(args) < 2 or self.record is None:
            return None
        mod = self.owners.get(id(args[1]))
        if mod is None or mod not in self.tied or (self.stack and self.stack[-1] is mod):
            return None
        return mod if isinstance(args[0], torch.Tensor) else None

    def _expand_shared(self, args: tuple) -> list:
        out = list(args)
        for j in (0, 1):
            P, other = args[j], args[1 - j]
            hit = self.shared.get(id(P)) if isinstance(P, torch.Tensor) else None
            if hit is None or hit[0] is not P or not isinstance(other, torch.Tensor):
                continue
            if other.dim() != P.dim() + 1 or other.shape[0] != self.m:
                continue
            call = hit[1]
            out[j] = P.unsqueeze(0).expand(self.m, *P.shape)
            call.out = out[j]
            call.x = call.x.unsqueeze(0).expand(self.m, *call.x.shape)
            call.version = call.x._version
            del self.shared[id(P)]
        return out


@dataclass
class _Call:
    x: torch.Tensor  # the recorded input (detached; shares the version counter)
    version: int  # its version when recorded: a later in-place change is detected
    out: torch.Tensor  # the module's own output (the model continues with a copy)
    tag: str = ""  # which computation inside the module (rules that record several)


def _record(
    fwd: Forward, inputs: Any, covered: dict[nn.Module, _Covered], m: int
) -> tuple[torch.Tensor, dict[nn.Module, list[_Call]], dict[nn.Module, str]]:
    """One forward pass with grad, recording each covered module's calls.

    Returns the output, the calls per module and the modules that must go to the fallback with
    the reason (parameter read outside the module, input modified in place afterwards). The
    forward hook hands the model a copy of the output, so an in-place operation after the layer
    (``ReLU(inplace=True)``) changes the copy, not the tensor whose gradient the rule needs.
    """
    records: dict[nn.Module, list[_Call]] = {}
    owners = {id(p): mod for mod, cov in covered.items() for p in cov.tensors}
    watch = _ReadWatch(owners, m)
    watch.tied = {mod for mod, cov in covered.items() if getattr(cov.rule, "tied", False)}
    declined: dict[nn.Module, str] = {}
    own = [mod for mod, cov in covered.items() if hasattr(cov.rule, "recording_forward")]

    def pre(mod: nn.Module, args: tuple) -> None:
        watch.stack.append(mod)

    def recorder(mod: nn.Module) -> Callable[..., torch.Tensor]:
        def rec(tag: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            x = x.detach()
            records.setdefault(mod, []).append(_Call(x, x._version, out, tag))
            return out.clone() if SAFEGUARDS["copy_outputs"] else out

        rec.decline = lambda why: declined.setdefault(mod, why)  # type: ignore[attr-defined]
        return rec

    watch.record = lambda mod, tag, x, out: recorder(mod)(tag, x, out)

    def post(mod: nn.Module, args: tuple, out: Any) -> Any:
        watch.stack.pop()
        if mod in own:
            return None
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            watch.leaked.add(mod)
            return None
        x = args[0].detach()
        call = _Call(x, x._version, out)
        records.setdefault(mod, []).append(call)
        given = out.clone() if SAFEGUARDS["copy_outputs"] else out
        unbatched = x.dim() < 2 or x.shape[0] != m
        if isinstance(mod, nn.Embedding) and unbatched and SAFEGUARDS["expand_shared"]:
            watch.shared[id(given)] = (given, call)  # perhaps no sample axis: see _ReadWatch
        return given if SAFEGUARDS["copy_outputs"] else None

    handles = [mod.register_forward_pre_hook(pre) for mod in covered]
    handles += [mod.register_forward_hook(post) for mod in covered]
    for mod in own:
        mod.forward = covered[mod].rule.recording_forward(mod, recorder(mod))
    try:
        with torch.enable_grad(), watch if SAFEGUARDS["watch_reads"] else contextlib.nullcontext():
            out = fwd(inputs)
    finally:
        for h in handles:
            h.remove()
        for mod in own:
            del mod.forward
    bad = {mod: "a parameter is read outside the module's forward" for mod in watch.leaked}
    for mod, why in declined.items():
        bad.setdefault(mod, why)
    for mod, calls in records.items():
        if any(c.x._version != c.version for c in calls):
            bad.setdefault(mod, "its input was modified in place after the call")
    for mod in covered:
        if mod not in records and SAFEGUARDS["missing_calls"]:
            bad.setdefault(mod, "its forward hooks did not run")
    return out, records, bad


def _user_name(name: str) -> str:
    """A parameter or module name of the :class:`Forward` wrapper as the user's model names it."""
    return name.removeprefix("model.") if name != "model" else "(the model)"


#: Bytes of output gradients all layers may store at once before materialised layers build
#: their rows pass by pass instead (:class:`_RowStream`; slower for small layers: smaller
#: products, the input patches rebuilt per row block).
GRAD_STORE_BYTES = 2**30

#: Bytes of one call's output gradients a :class:`_RowStream` collects before building rows.
STREAM_BLOCK_BYTES = 64 * 2**20


class _RowStream:
    """Per-sample rows of one module call built from blocks of rows' output gradients as the
    passes deliver them, so that the (m, R, ...) output gradients of the call are never stored.

    Used where the rows are smaller than the output gradients: rules that return rows (the
    affine parameters of a norm layer: 2 P numbers per sample and row against T P), and,
    when all layers' output gradients would exceed :data:`GRAD_STORE_BYTES`, layers that are
    materialised anyway with o k < T o (the first convolutions of a ResNet).
    """

    def __init__(self, cov: _Covered, mod: nn.Module, call: _Call, R: int, rows: bool) -> None:
        self.cov, self.mod, self.call, self.R, self.rule_rows = cov, mod, call, R, rows
        self.bufs: list[torch.Tensor] | None = None
        self.pending: list[torch.Tensor] = []
        self.block = max(
            1, STREAM_BLOCK_BYTES // max(1, call.out.numel() * call.out.element_size())
        )
        self.start = 0

    def __call__(self, r: int, g: torch.Tensor) -> None:
        self.pending.append(g)
        if len(self.pending) == self.block or r == self.R - 1:
            self._flush()

    def _flush(self) -> None:
        cov = self.cov
        g = torch.stack(self.pending)
        n = len(self.pending)
        self.pending = []
        pieces = cov.rule.pieces(self.mod, self.call.x, g, cov.weight, cov.bias)
        del g
        if self.rule_rows:
            rows = [p.rows for p in pieces]
        else:
            rows = [t for p in pieces for t in _materialise(p.d, p.a, p.ones)]
        if self.bufs is None:
            self.bufs = [t.new_empty(t.shape[0], self.R, *t.shape[2:]) for t in rows]
        for buf, t in zip(self.bufs, rows, strict=True):
            buf[:, self.start : self.start + n] = t
        self.start += n

    def pieces(self) -> list[Piece]:
        return [Piece(rows=t) for t in self.bufs or []]


def _row_streams(
    calls: list[tuple[nn.Module, _Call]],
    covered: dict[nn.Module, _Covered],
    records: dict[nn.Module, list[_Call]],
    m: int,
    R: int,
    force: str | None,
    accumulate: bool,
) -> dict[int, _RowStream]:
    """The calls whose rows are built as the passes go (:class:`_RowStream`), by call index.

    Decided from the rule's pieces of one sample and a zero output gradient, for modules
    called once: always where the pieces are all rows; for pieces all materialised (by the
    cost model or ``force``) with fewer row entries than output-gradient entries per sample
    (and, when streaming, at most :data:`ROW_BLOCK_BYTES` of rows), largest saving first
    until the stored output gradients fit :data:`GRAD_STORE_BYTES`.
    """
    out: dict[int, _RowStream] = {}
    stored = sum(c.out.numel() * c.out.element_size() for _, c in calls) * R
    savings = []
    for k, (mod, call) in enumerate(calls):
        batched = call.x.dim() > 0 and call.x.shape[0] == m and call.out.shape[0] == m
        if force == "fallback" or not batched or len(records[mod]) != 1 or call.out.dim() < 2:
            continue
        cov = covered[mod]
        g0 = call.out.new_zeros((1, 1, *call.out.shape[1:]))
        probe = cov.rule.pieces(mod, call.x[:1], g0, cov.weight, cov.bias)
        if not probe:
            continue
        if all(p.rows is not None for p in probe):
            out[k] = _RowStream(cov, mod, call, R, rows=True)
            stored -= call.out.numel() * call.out.element_size() * R
            continue
        if force == "ghost" or any(p.rows is not None or p.index for p in probe):
            continue
        size = 0
        for p in probe:
            T, o, kk = p.d.shape[2], p.d.shape[3], p.a.shape[2]
            if force != "materialise" and _ghost_cheaper(T, kk, o, R, m):
                size = -1
                break
            size += o * (kk + p.ones)
        fits = not accumulate or m * R * size * call.out.element_size() <= ROW_BLOCK_BYTES
        if 0 < size < call.out[0].numel() and fits:
            saved = (call.out[0].numel() - size) * m * R * call.out.element_size()
            savings.append((saved, k))
    for saved, k in sorted(savings, reverse=True):
        if stored <= GRAD_STORE_BYTES:
            break
        mod, call = calls[k]
        out[k] = _RowStream(covered[mod], mod, call, R, rows=False)
        stored -= saved
    return out


def _output_gradients(
    out: torch.Tensor,
    outs: list[torch.Tensor],
    sqrt: Any,
    R: int,
    streams: dict[int, _RowStream],
) -> list[torch.Tensor | None]:
    """The gradients of every recorded output for the R cotangents, each (R, *shape) as a view
    of one buffer laid out (n, R, ...) (sample axis first), filled pass by pass: no list of
    R tensors to stack, and the rows of a sample are contiguous for the rules' products.
    Outputs in ``streams`` get no buffer: each pass's gradient goes to the stream (None)."""
    bufs: list[torch.Tensor | None] = []
    for j, o in enumerate(outs):
        if j in streams:
            bufs.append(None)
        elif o.dim() == 0:
            bufs.append(o.new_empty((R,)))
        else:
            bufs.append(o.new_empty(o.shape[0], R, *o.shape[1:]).transpose(0, 1))
    for r in range(R if outs else 0):
        cot = column(sqrt, r).to(out.dtype).reshape(out.shape)
        gs = torch.autograd.grad(out, outs, cot, retain_graph=True, allow_unused=True)
        for j, (buf, g) in enumerate(zip(bufs, gs, strict=True)):
            if buf is None:
                streams[j](r, torch.zeros_like(outs[j]) if g is None else g)
            elif g is None:
                buf[r].zero_()
            else:
                buf[r].copy_(g)
    return bufs


def _ghost_cheaper(T: int, k: int, o: int, R: int, m: int) -> bool:
    """Whether the ghost product (:func:`_ghost_pair`) costs fewer multiply-adds per pair of
    rows than materialising the rows (o k per pair, plus forming them: T o k per row)."""
    ghost = T * T * (k + R * o) / (R * R) + T * o
    return T == 1 or ghost <= o * k * (1 + T / (m * R))


def _work(t: torch.Tensor) -> torch.Tensor:
    """Factors of a half-precision model are multiplied in float32 (others in their dtype)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _materialise(d: torch.Tensor, a: torch.Tensor, ones: bool) -> list[torch.Tensor]:
    """Per-sample rows sum_t d_t a_t^T (m, R, o k), and the bias rows sum_t d_t (m, R, o)."""
    d, a = _work(d), _work(a)
    m, R, T, o = d.shape
    dt = d.transpose(2, 3).reshape(m, R * o, T)
    if a.shape[2] < 64:  # a narrow input (a first convolution): the product the other way round
        out = [torch.bmm(a.transpose(1, 2), dt.transpose(1, 2)).transpose(1, 2).reshape(m, R, -1)]
    else:
        out = [torch.bmm(dt, a).reshape(m, R, -1)]
    if ones:
        out.append(dt.sum(2).reshape(m, R, o))
    return out


def _add_pieces(
    facs: GramFactors,
    label: str,
    per_call: list[list[Piece]],
    m: int,
    R: int,
    force: str | None,
    accumulate: bool = False,
) -> None:
    """Concatenate ghost pieces over calls along t (sum rows) and add them to ``facs``.

    Pieces are matched across calls by their position and ``key`` (the recorded tag). Factors
    stay in the model's dtype (K is summed in float64). With ``accumulate``, a materialised
    layer whose rows would exceed :data:`ROW_BLOCK_BYTES` is added as its dense Gram, built
    from sample blocks of its rows.
    """
    groups: dict[tuple[str, int], list[Piece]] = {}
    for call in per_call:
        for k, piece in enumerate(call):
            groups.setdefault((piece.key, k), []).append(piece)
    for parts in groups.values():
        if parts[0].rows is not None:
            facs.rows.append(sum(p.rows for p in parts))
            facs.row_labels.append(label)
            continue
        index, ones = parts[0].index, parts[0].ones
        if len(parts) == 1:  # a layer called once: no concatenated copy
            a, d = parts[0].a, parts[0].d
        else:
            a = torch.cat([p.a for p in parts], 1)
            d = torch.cat([p.d for p in parts], 2)
        T, o_dim = d.shape[2], d.shape[3]
        k_dim = 1 if index else a.shape[2]
        ghost = (
            force == "ghost"
            or index
            or (force != "materialise" and _ghost_cheaper(T, k_dim, o_dim, R, m))
        )
        if ghost:  # contiguous once, not per block product
            a, d = _work(a).contiguous(), _work(d).contiguous()
            facs.ghosts.append(_Ghost(a=a, d=d, index=index, label=label, ones=ones))
        elif accumulate and m * R * o_dim * k_dim * d.element_size() > ROW_BLOCK_BYTES:
            K = _blocked_rows_gram(d, a, ones)
            facs.dense = K if facs.dense is None else facs.dense.add_(K)
        else:
            for rows in _materialise(d, a, ones):
                facs.rows.append(rows)
                facs.row_labels.append(label)


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
    check: int = 2,
    seed: int = 0,
    accumulate: bool = False,
    sink: Callable[[GramFactors], None] | None = None,
) -> GramFactors:
    """Factor structure of K for cotangents ``sqrt`` (m, C, R), verified against autograd.

    Args:
        model: the model (already in eval mode); compiled submodules are run eagerly
            (:func:`eager_modules`).
        inputs: the probe batch (tensor, or anything ``forward_fn`` takes).
        sqrt: (m, C, R) square roots of the output Hessians (float64): a tensor, or a
            lazy factor whose columns are built one at a time (:mod:`.losses.factor`).
        params: the selected trainable parameters by name as in ``model.named_parameters()``.
        forward_fn: ``forward_fn(model, inputs) -> outputs`` for non-tensor batches.
        chunk_size: samples per ``vmap`` call of the fallback (default 32).
        outputs_check: called with the (m, C) outputs of the recording forward pass.
        force: ``"ghost"``, ``"materialise"`` or ``"fallback"`` to force one assembly path for
            all covered layers (testing); default chooses per layer by cost.
        check: random coefficient vectors of the self-check (:mod:`.selfcheck`; one backward
            pass each); 0 switches it off.
        seed: seed of the self-check's coefficient vectors.
        accumulate: stream K: sum each layer's Gram into ``GramFactors.dense`` as soon as
            its factors exist (and are checked) and free them, and compute the fallback rows
            in parameter groups of at most :data:`FALLBACK_GROUP_BYTES` (peak memory: the
            largest layer's factors plus the (m R)^2 Gram, instead of every layer's factors
            at once).
        sink: receives each layer's (and fallback parameter's) checked factors as a
            :class:`GramFactors` of their own instead of the result (e.g.
            :class:`SketchSink`, which projects them before the next layer is built); the
            returned factors are then empty.

    The result's ``notes`` say which blocks went to the fallback and why, and the self-check's
    relative error.
    """
    from .selfcheck import SelfCheck

    with eager_modules(model) as eager:
        fwd = Forward(eager, forward_fn)
        m, _C, R = sqrt.shape
        by_id = {id(p): p for p in params.values()}
        selected = {k: p for k, p in fwd.named_parameters() if id(p) in by_id}
        covered, fallback = _split_params(fwd, selected)
        if force == "fallback":
            fallback, covered = dict(selected), {}
        facs = GramFactors(m=m, R=R)
        consume = sink or (facs.absorb if accumulate else facs.extend)
        chunk = chunk_size or 32
        out, records, bad = _record(fwd, inputs, covered, m)
        flat = out.reshape(m, -1)
        if outputs_check is not None:
            outputs_check(flat)
        labels = {mod: _user_name(name) for name, mod in fwd.named_modules()}
        live = [mod for mod in covered if mod not in bad and mod in records]
        calls = [(mod, c) for mod in live for c in records[mod]]
        outs = [c.out for _, c in calls]
        streams = _row_streams(calls, covered, records, m, R, force, accumulate)
        grads = _output_gradients(out, outs, sqrt, R, streams)
        checker = SelfCheck(out, sqrt, selected, check, seed, m, R) if check and selected else None

        def refit(names: list[str]) -> dict[str, torch.Tensor]:
            return _fallback_rows(fwd, inputs, sqrt, {k: selected[k] for k in names}, chunk)

        def take(part: GramFactors, label: str, names: list[str], can_refit: bool) -> None:
            """Check one block while its factors exist, then hand it on (kept/summed/sketched).

            Streamed, the block's Gram is formed first and the check runs on it (products
            with the (m R)^2 block instead of the factors; it checks the assembly too)."""
            if checker is not None and consume == facs.absorb:
                part = GramFactors(m=m, R=R, notes=facs.notes, dense=part.full(), dense_label=label)
            if checker is not None:
                checker.check(part, label, names, refit if can_refit else None)
            consume(part)

        k = 0
        for mod in live:
            cov = covered[mod]
            per_call = []
            for call in records[mod]:
                batched = call.x.dim() > 0 and call.x.shape[0] == m and call.out.shape[0] == m
                g = grads[k]
                grads[k] = None  # freed with this module's factors
                if k in streams:
                    pieces = streams.pop(k).pieces()
                elif batched:
                    pieces = cov.rule.pieces(mod, call.x, g, cov.weight, cov.bias)
                else:
                    pieces = None
                for piece in pieces or ():
                    piece.key = call.tag
                per_call.append(pieces)
                k += 1
            records[mod] = []
            if any(p is None for p in per_call):
                bad[mod] = "its input or output has no leading sample axis of the probe's size"
                continue
            if hasattr(cov.rule, "combine"):  # pieces of several calls that interact (tying)
                per_call = cov.rule.combine(mod, per_call)
            part = GramFactors(m=m, R=R, notes=facs.notes)
            _add_pieces(part, labels[mod], per_call, m, R, force, accumulate)
            del per_call
            take(part, labels[mod], cov.names, can_refit=True)
            del part
        del grads, records
        for mod in covered:  # covered modules whose hooks never ran (safeguard off): K_b = 0
            if mod not in bad and mod not in live:
                part = GramFactors(m=m, R=R, notes=facs.notes)
                take(part, labels[mod], covered[mod].names, can_refit=True)
        for mod, why in bad.items():
            fallback.update({k: selected[k] for k in covered[mod].names})
            facs.notes.fallback.update(dict.fromkeys(map(_user_name, covered[mod].names), why))
        for name in fallback:
            facs.notes.fallback.setdefault(_user_name(name), "no layer rule covers it")
        groups = _groups(fallback, m * R * 8) if accumulate or sink else [fallback]
        stream = accumulate and sink is None  # rows stay in the model's dtype until the Gram
        for group in groups:
            for name, rows in _fallback_rows(fwd, inputs, sqrt, group, chunk, stream).items():
                if stream:
                    part = GramFactors(m=m, R=R, dense=_stored_rows_gram(rows))
                else:
                    part = GramFactors(m=m, R=R, rows=[rows], row_labels=[_user_name(name)])
                del rows
                part.notes = facs.notes
                take(part, _user_name(name), [name], can_refit=False)
        if checker is not None:
            checker.finish(facs.notes)
    return facs


#: Bytes of one layer's materialised per-sample rows held at once when the Gram is streamed;
#: a larger layer's Gram is built from sample blocks of its rows (recomputed per block pair).
ROW_BLOCK_BYTES = 512 * 2**20


def _blockwise_gram(
    rows: Callable[[slice], torch.Tensor], m: int, R: int, P: int, itemsize: int
) -> torch.Tensor:
    """K (m, R, m, R) float64 from rows (n R, P) of sample blocks, ``rows(block)`` each (in
    their dtype)."""
    n = max(1, ROW_BLOCK_BYTES // (2 * R * P * itemsize))
    K = torch.empty(m, R, m, R, dtype=torch.float64)
    for s in range(0, m, n):
        I = slice(s, min(s + n, m))  # noqa: E741
        rI = rows(I)
        for t in range(s, m, n):
            J = slice(t, min(t + n, m))
            if t == s:
                blk = _sym_gram(rI).view(I.stop - I.start, R, -1, R)
            else:
                blk = (rI @ rows(J).T).view(I.stop - I.start, R, -1, R)
            K[I, :, J, :] = blk
            K[J, :, I, :] = blk.permute(2, 3, 0, 1)
    return K


def _blocked_rows_gram(d: torch.Tensor, a: torch.Tensor, ones: bool = False) -> torch.Tensor:
    """One layer's K (m, R, m, R) from rows sum_t d_t a_t^T built a sample block at a time."""
    m, R, _, o = d.shape
    P = o * (a.shape[2] + ones)

    def rows(sl: slice) -> torch.Tensor:
        return torch.cat(_materialise(d[sl], a[sl], ones), 2).reshape(-1, P)

    return _blockwise_gram(rows, m, R, P, d.element_size())


def _stored_rows_gram(rows: torch.Tensor) -> torch.Tensor:
    """K (m, R, m, R) in float64 from rows (m, R, P) kept in the model's dtype (Gram blocks in
    that dtype, summed in float64)."""
    m, R, P = rows.shape
    return _blockwise_gram(lambda sl: rows[sl].reshape(-1, P), m, R, P, rows.element_size())


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
) -> dict[str, torch.Tensor]:
    """Per-sample rows J_i^T b_ir for the fallback parameters, {name: (m, R, P)} float64 (in
    the model's dtype with ``keep_dtype``), each filled chunk by chunk into one tensor.

    ``vmap`` over samples of ``vmap`` over the R cotangents of ``vjp``; where the model cannot
    be vmapped over samples (``nn.GRU`` and float64 ``nn.LSTM`` in torch 2.13 write in place
    into an unbatched buffer), one sample at a time, still vmapped over the cotangents.
    """
    if not fallback:
        return {}
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

    def take(sl: Any) -> Any:
        return tree_map(lambda t: t[sl] if isinstance(t, torch.Tensor) else t, inputs)

    out: dict[str, torch.Tensor] = {}

    def fill(sl: slice, g: dict[str, torch.Tensor]) -> None:
        for k in names:
            part = g[k].detach().reshape(sl.stop - sl.start, R, -1)
            if k not in out:  # (m, R, P) per parameter, no list of chunks to concatenate
                dtype = part.dtype if keep_dtype else torch.float64
                out[k] = torch.empty(m, R, part.shape[2], dtype=dtype, device=part.device)
            out[k][sl] = part

    try:
        batched = vmap(sample_rows)
        for s in range(0, m, chunk):
            sl = slice(s, min(s + chunk, m))
            fill(sl, batched(take(sl), sample_block(sqrt, sl)))
    except RuntimeError:
        out.clear()
        for i in range(m):
            xi = tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) else t, inputs)
            g = sample_rows(xi, sample_block(sqrt, slice(i, i + 1))[0])
            fill(slice(i, i + 1), {k: v.unsqueeze(0) for k, v in g.items()})
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
            kk = g.a.shape[-1] + g.ones
            om = torch.randn(o, kk, k, generator=generator, dtype=torch.float64) * scale
        for s in range(0, m, chunk):
            sl = slice(s, min(s + chunk, m))
            if g.index:
                ids = g.a[sl]
                Y = om[ids.clamp_min(0)] * (ids >= 0).view(*ids.shape, 1, 1).to(om.dtype)
            else:
                a = g.a[sl].double()
                if g.ones:
                    a = torch.cat([a, a.new_ones((*a.shape[:2], 1))], 2)
                Y = torch.einsum("itc,ocq->itoq", a, om)
            Z[sl] += torch.einsum("irto,itoq->irq", g.d[sl].double(), Y)
    for rows in facs.rows:
        om = torch.randn(rows.shape[-1], k, generator=generator, dtype=torch.float64) * scale
        Z += rows.double() @ om
    return GramFactors(m=m, R=R, rows=[Z], row_labels=["sketch"], notes=facs.notes)


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
        keep = GramFactors(m=part.m, R=tail.R, notes=part.notes)
        keep.ghosts = [_Ghost(g.a, g.d.clone(), g.index, g.label, g.ones) for g in tail.ghosts]
        keep.rows = [r.clone() for r in tail.rows]
        keep.row_labels = list(tail.row_labels)
        if self.tail is None:
            self.tail = keep
        else:
            self.tail.extend(keep)

    def result(self) -> tuple[GramFactors, GramFactors]:
        """(sketched factors of the first rows, exact factors of the rest)."""
        m = self.Z.shape[0]
        tail = self.tail if self.tail is not None else GramFactors(m=m, R=0)
        return GramFactors(m=m, R=self.rows, rows=[self.Z], row_labels=["sketch"]), tail
