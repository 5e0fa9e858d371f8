r"""Self-check of an assembled block Gram against plain autograd, block by block.

K = A A^T with A the (m R) x d matrix of factor rows :math:`A_{ir} = J_i^\top b_{ir}`. For a
coefficient vector c over the m R rows, :math:`A^\top c` is the gradient of the scalar
:math:`\sum_i c_i \cdot B_i^\top f(x_i)` (B detached): one ordinary backward pass through the
recording forward graph, with no layer rule involved. K is a sum over parameter blocks b
(a covered module, or one fallback parameter), :math:`K = \sum_b A_b A_b^\top`, and for V random
Gaussian vectors :math:`c_1..c_V` the engine must satisfy, per block,

.. math::

    (A_b^\top c_v) \cdot (A_b^\top c_w) = c_v^\top K_b c_w \qquad (v, w \le V),

the right side computed from the engine's own factors (:math:`A_b^\top c` in the factor basis,
e.g. :math:`\sum_{j,s,u} c_{js}\,\delta_{js,u} a_{j,u}^\top` for a ghost layer). A wrong block
(a layer rule fed a mutated input, a parameter also read outside its module, a graph the hooks
did not see, a sample axis that is not the first axis) breaks the identity for almost every c:
a K_b' != K_b agrees on the V x V Gram of random vectors only on a set of measure zero.

Tolerance: relative error ``TOL[dtype]`` of the model's output dtype (float64 1e-8, float32
1e-3, half precision 5e-2) against the block's largest diagonal entry. Measured on the case
table (``tests/curvature/test_cases.py``, 17 models x 2 losses): correct blocks stayed below
9e-16 (float64) and 5e-7 (float32); the silent failures it exists for measured 0.28 (in-place
ReLU), 0.32 (weight tying), 0.96-1.0 (positional embedding with T = m, compiled graph) and
about |s^2 - 1| for a rule whose input is scaled by s (``tests/curvature/test_selfcheck.py``).

Cost: V extra backward passes of the recording graph (default V = 2) plus products with the
factors. Measured on the digits MLP (64-256-256-10, 85k parameters, m = 256, cross-entropy,
R = 11 rows; 1 thread, load 11-12 on 2 cores, ``benchmarks/bench_selfcheck.py``): the check
took 0.06-0.08 s of a 1.6-2.0 s probe (3.5-4.3%). A block that fails is recomputed through the
``torch.func`` fallback and checked again with the same vectors, and a block that still fails
raises ``RuntimeError`` (never a silently wrong Gram). Memory: the V autograd gradients in the
parameters' dtype, and one block's projections at a time in float64 (V times that layer's
weight size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .gram import GramFactors

__all__ = ["TOL", "check_tolerance", "self_check"]

#: Relative tolerance of the check per output dtype.
TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def check_tolerance(dtype: torch.dtype) -> float:
    """The check's relative tolerance for a model computing in ``dtype``."""
    return TOL.get(dtype, 1e-3)


def _projections(facs: GramFactors, c: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(block label, A_e^T c) per factor entry e, in the entry's own basis (V, ...), c (V, m, R).

    One entry at a time, so the peak memory is one entry's projection (a layer's weight size
    times V), not all of them.
    """
    for g in facs.ghosts:
        W = torch.einsum("jsuo,vjs->vjuo", g.d, c)  # (V, m, T, o)
        V, o = W.shape[0], W.shape[-1]
        if g.index:
            ids = g.a.reshape(-1)
            ok = ids >= 0
            M = torch.zeros(V, int(ids.max()) + 1 if ok.any() else 1, o, dtype=W.dtype)
            M.index_add_(1, ids[ok], W.reshape(V, -1, o)[:, ok])
        else:
            M = W.reshape(V, -1, o).transpose(1, 2) @ g.a.reshape(-1, g.a.shape[-1])
        yield g.label, M.reshape(V, -1)
    for rows, label in zip(facs.rows, facs.row_labels, strict=True):
        yield label, torch.einsum("irp,vir->vp", rows, c)


def _engine_grams(facs: GramFactors, c: torch.Tensor, only: str | None = None) -> dict:
    """c_v^T K_b c_w (V, V) per block label b from the engine's factors."""
    out: dict[str, torch.Tensor] = {}
    for label, z in _projections(facs, c):
        if only is None or label == only:
            out[label] = out.get(label, 0) + z @ z.T
    return out


def _error(auto: torch.Tensor, eng: torch.Tensor, floor: float) -> float:
    scale = max(float(auto.diagonal().max()), float(eng.diagonal().max()), floor)
    return float((auto - eng).abs().max()) / scale if scale > 0 else 0.0


def self_check(
    facs: GramFactors,
    out: torch.Tensor,
    cot: torch.Tensor,
    blocks: dict[str, list[torch.Tensor]],
    vectors: int,
    seed: int,
    refit: Callable[[list[str]], dict[str, torch.Tensor]],
    names: dict[str, list[str]],
) -> None:
    """Check every block of ``facs`` (see the module docstring); fix or raise.

    Args:
        facs: the factors; wrong rule blocks are replaced in place, ``facs.notes`` filled in.
        out: the model output of the recording pass (its graph retained).
        cot: (R, *out.shape) cotangents b_r (the columns of B), in the output dtype.
        blocks: block label -> its parameter tensors.
        vectors: V, the number of random coefficient vectors (one backward pass each).
        seed: seed of the coefficient vectors.
        refit: fallback rows {parameter name: (m, R, P)} for a list of parameter names.
        names: rule block label -> its parameter names (blocks that can be refitted).
    """
    m, R = facs.m, facs.R
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(vectors, m, R, generator=gen, dtype=torch.float64)
    labels = list(blocks)
    params = [p for lab in labels for p in blocks[lab]]
    cot_flat = cot.reshape(R, m, -1)
    grads = []
    for v in range(vectors):
        u = torch.einsum("rmc,mr->mc", cot_flat, c[v].to(cot.dtype)).reshape(out.shape)
        gs = torch.autograd.grad(out, params, u, retain_graph=True, allow_unused=True)
        grads.append([None if g is None else (g.to_dense() if g.is_sparse else g) for g in gs])
    auto: dict[str, torch.Tensor] = {}
    k = 0
    for lab in labels:
        n = len(blocks[lab])
        auto[lab] = torch.zeros(vectors, vectors, dtype=torch.float64)
        for i in range(k, k + n):  # one parameter at a time, in float64
            if grads[0][i] is None:
                continue
            vecs = torch.stack([gr[i].reshape(-1).double() for gr in grads])
            auto[lab] += vecs @ vecs.T
        k += n
    del grads
    tol = check_tolerance(out.dtype)
    zero = torch.zeros(vectors, vectors, dtype=torch.float64)
    grams = _engine_grams(facs, c)
    eng = {lab: grams.get(lab, zero) for lab in labels}
    floor = 1e-12 * sum(float(a.diagonal().max()) for a in auto.values())
    errors = {lab: _error(auto[lab], eng[lab], floor) for lab in labels}
    for lab, err in list(errors.items()):
        if err <= tol or lab not in names:
            continue
        rows = refit(names[lab])
        facs.replace(lab, torch.cat([rows[k] for k in names[lab]], 2))
        facs.notes.rechecked[lab] = err
        facs.notes.fallback[lab] = f"the self-check found its layer rule wrong (error {err:.1e})"
        errors[lab] = _error(auto[lab], _engine_grams(facs, c, lab).get(lab, zero), floor)
    facs.notes.check_error = max(errors.values(), default=0.0)
    facs.notes.check_passes = vectors
    worst = max(errors, key=errors.get, default=None)
    if worst is not None and errors[worst] > tol:
        raise RuntimeError(
            f"curvature self-check: block {worst!r} of the Gram disagrees with autograd "
            f"(relative error {errors[worst]:.2e} > tolerance {tol:.0e}) even through the "
            "torch.func fallback; the model's per-sample outputs may not be independent "
            "(batch statistics, cross-sample attention?)"
        )
