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
parameters' dtype, then one V x V Gram per parameter. Each block is checked while its factors
exist (:class:`SelfCheck`), before a streamed Gram sums it into a dense K or a sketch projects
it, so streaming and sketching never skip the check; the sketch itself is the one approximate
step after it. Streamed, the engine forms the block's Gram first and the check multiplies by
it (V products with an (m R)^2 block, which checks the Gram assembly as well as the factors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .gram import GramFactors
from .losses.factor import column

__all__ = ["TOL", "SelfCheck", "check_tolerance"]

#: Relative tolerance of the check per output dtype.
TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def check_tolerance(dtype: torch.dtype) -> float:
    """The check's relative tolerance for a model computing in ``dtype``."""
    return TOL.get(dtype, 1e-3)


def _gram_of(part: GramFactors, c: torch.Tensor) -> torch.Tensor:
    """c_v^T K_part c_w (V, V) through the factors' own product (ghosts, rows or a dense K)."""
    flat = c.reshape(c.shape[0], -1)
    products = torch.stack([part.matvec(v) for v in flat])  # (V, m R)
    eng = flat @ products.T
    return (eng + eng.T) / 2


def _error(auto: torch.Tensor, eng: torch.Tensor, floor: float) -> float:
    scale = max(float(auto.diagonal().max()), float(eng.diagonal().max()), floor)
    return float((auto - eng).abs().max()) / scale if scale > 0 else 0.0


def _combine(sqrt: Any, coeffs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum_r coeffs[i, r] b_ir for every sample i, shaped like ``out``."""
    if isinstance(sqrt, torch.Tensor):
        return torch.einsum("mcr,mr->mc", sqrt.to(out.dtype), coeffs.to(out.dtype)).reshape(
            out.shape
        )
    u = torch.zeros(out.shape[0], out[0].numel(), dtype=out.dtype, device=out.device)
    for r in range(coeffs.shape[1]):
        u += column(sqrt, r).to(out.dtype) * coeffs[:, r : r + 1].to(out.dtype)
    return u.reshape(out.shape)


class SelfCheck:
    r"""The autograd side of the check, computed once; blocks are checked as they are built.

    The V backward passes give, per parameter p, the V x V Gram
    :math:`G_p = (A_p^\top c_v \cdot A_p^\top c_w)_{vw}`; a block's autograd Gram is the sum
    over its parameters (concatenation adds the inner products). Each block is checked, and
    if wrong refitted, while its factors still exist, so a streamed Gram (layers summed into
    a dense K and freed, or sketched) is verified block by block before it is summed.

    Args:
        out: the model output of the recording pass (its graph retained).
        sqrt: the (m, C, R) square roots whose columns b_r are the cotangents: a tensor or a
            lazy factor (:mod:`.losses.factor`), combined column by column.
        params: parameter name -> tensor, every parameter of every block.
        vectors: V, the number of random coefficient vectors (one backward pass each).
        seed: seed of the coefficient vectors.
        m, R: samples and rows per sample.
    """

    def __init__(
        self,
        out: torch.Tensor,
        sqrt: Any,
        params: dict[str, torch.Tensor],
        vectors: int,
        seed: int,
        m: int,
        R: int,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.c = torch.randn(vectors, m, R, generator=gen, dtype=torch.float64)
        names = list(params)
        tensors = [params[k] for k in names]
        grads = []  # V gradients in the parameters' own dtype
        for v in range(vectors):
            u = _combine(sqrt, self.c[v], out)
            gs = torch.autograd.grad(out, tensors, u, retain_graph=True, allow_unused=True)
            grads.append([None if g is None else (g.to_dense() if g.is_sparse else g) for g in gs])
        grams = {}
        for j, k in enumerate(names):  # one parameter at a time in float64
            if grads[0][j] is None:
                grams[k] = torch.zeros(vectors, vectors, dtype=torch.float64)
                continue
            vecs = torch.stack([gr[j].reshape(-1).double() for gr in grads])
            grams[k] = vecs @ vecs.T
        del grads
        self.auto = grams
        self.vectors = vectors
        self.tol = check_tolerance(out.dtype)
        self.floor = 1e-12 * sum(float(g.diagonal().max()) for g in grams.values())
        self.errors: dict[str, float] = {}

    def check(
        self,
        part: GramFactors,
        label: str,
        names: list[str],
        refit: Callable[[list[str]], dict[str, torch.Tensor]] | None,
    ) -> None:
        """Check block ``label`` (all of ``part``); refit it through the fallback if wrong."""
        auto = sum((self.auto[k] for k in names), torch.zeros_like(next(iter(self.auto.values()))))
        err = _error(auto, _gram_of(part, self.c), self.floor)
        if err > self.tol and refit is not None:
            rows = refit(names)
            part.replace(label, torch.cat([rows[k] for k in names], 2))
            part.notes.rechecked[label] = err
            part.notes.fallback[label] = (
                f"the self-check found its layer rule wrong (error {err:.1e})"
            )
            err = _error(auto, _gram_of(part, self.c), self.floor)
        self.errors[label] = max(err, self.errors.get(label, 0.0))

    def finish(self, notes: Any) -> None:
        """Record the largest error and the passes in ``notes``; raise if a block is wrong."""
        notes.check_error = max(self.errors.values(), default=0.0)
        notes.check_passes = self.vectors
        worst = max(self.errors, key=self.errors.get, default=None)
        if worst is not None and self.errors[worst] > self.tol:
            raise RuntimeError(
                f"curvature self-check: block {worst!r} of the Gram disagrees with autograd "
                f"(relative error {self.errors[worst]:.2e} > tolerance {self.tol:.0e}) even "
                "through the torch.func fallback; the model's per-sample outputs may not be "
                "independent (batch statistics, cross-sample attention?)"
            )
