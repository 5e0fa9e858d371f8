r"""``measure_curvature``: coherence, sharpness and gradient noise scale of a model on a probe.

Pipeline (docs/theory.md §2-3, §6): forward the probe batch in eval mode inside
:func:`torch_coherence._state.preserved_state`; output-Hessian square roots :math:`B_i`
(:mod:`.losses`); the block Gram :math:`K = AA^\top` by layer rules (:mod:`.gram`), with the
per-sample loss gradients appended as one extra cotangent so the per-sample gradient Gram
:math:`P_{ij} = g_i \cdot g_j` comes from the same passes; coherence statistics from K
(small m) or chunk-wise from S and the diagonal blocks plus Lanczos on K-products (large m,
K never formed); the Hessian sharpness by Lanczos on HVPs.

Gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training",
eq. 2.8 and App. A): :math:`B_{simple} = \mathrm{tr}(\Sigma)/|G|^2` with the unbiased
estimators from P:
:math:`\widehat{|G|^2} = \frac{1}{m(m-1)}\sum_{i\ne j} P_{ij}` and
:math:`\widehat{\mathrm{tr}\Sigma} = \frac{1}{m-1}\big(\sum_i P_{ii} - m |\bar g|^2\big)`
(the sample covariance trace). The ratio is consistent, not unbiased; it is ``inf`` when the
estimate of :math:`|G|^2` is not positive. P itself is never formed: only
:math:`\sum_{ij} P_{ij} = \mathbf 1^\top P \mathbf 1` (one product through the factors) and
:math:`\mathrm{tr} P` are needed.

Full-data sigma (n > m). The probe S is an m x m sample of the n x n matrix S_n. With the
probe rows drawn uniformly without replacement, the off-diagonal row sums of S_n are estimated
without bias by :math:`\frac{n-1}{m-1}` times the probe's, so

.. math::

    \hat\sigma_n = \lambda_1\!\Big(\mathrm{diag}(S) + \tfrac{n-1}{m-1}\,(S - \mathrm{diag}(S))\Big)
        \Big/ \max_i \lambda_1(H_i)

("rescaled off-diagonal" estimator; exact for identical H_i, where it gives n, and for mutually
orthogonal H_i, where it gives the probe value). The denominator is the probe maximum, an
extreme value over m examples that a probe of m << n cannot see; with a uniform probe both
parts fail when a few examples carry most of the curvature. Measured (``docs/estimates.md``):
within 11% only on the BCE MLP of ``tests/curvature/test_full_data.py`` (exact sigma_n =
335.7; m = 256: errors 1-11% over 5 draws), but off by more than 25% in at least one draw on
all 8 setups there at m = 64 (up to +187%) and on two at m = 256 (up to +81%). ``sigma_full``
is kept for reference only: the probe does not use it, and the full-data sigma with a
standard error is :func:`torch_coherence.estimate_sigma` (curvature-weighted probe, within 3%
at m = 256 on 7 setups) or :func:`torch_coherence.exact_sigma`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._validation import (
    NonFiniteError,
    check_probe_inputs,
    check_probe_model,
    check_targets,
    default_tol,
    embedding_id_guard,
    forward_error,
)
from ..coherence import CoherenceStats, _finish, coherence_from_gram
from ..linalg import lanczos, top_eigenvalue
from .gram import Forward, GramFactors, SketchSink, eager_modules, gram_factors
from .losses import (
    append_columns,
    check_loss,
    is_finite,
    output_curvature,
    output_gradients,
    per_sample_losses,
    sampled_curvature,
    truncated_curvature,
)

#: K is formed whole when m * R is at most this (m R = 1024: 8.4 MB in float64). Above it,
#: S and the diagonal blocks are assembled block by block and lambda_1(K) comes from Lanczos
#: on K-products, so the peak memory is that of the layer factors plus a few blocks, not of K:
#: on the digits MLP (m = 256, C = 10, m R = 2560) forming K whole cost 218 MB above the
#: baseline, the blockwise path 15-16 MB with 512-row blocks and 47-62 MB with 1024-row
#: blocks, at the same speed (``benchmarks/bench_curvature.py``, part a).
DENSE_LIMIT = 1024

#: Under ``eig_method="auto"``, lambda_1(K) of a formed K with more rows than this comes from
#: Lanczos (products with K, float64) rather than a dense eigendecomposition: on the CNN of
#: ``benchmarks/bench_scale.py`` (m R = 640) ``eigvalsh`` took 15% of the engine.
DENSE_EIG_MAX = 256

#: Rows (m R) per block of the blockwise path: blocks of at most 512 x 512 (2.1 MB).
BLOCK_ROWS = 512


@dataclass(frozen=True)
class CurvatureReport:
    r"""What :func:`measure_curvature` measured on a probe batch of ``num_samples`` examples.

    Attributes:
        stats: coherence statistics of the probe (sigma, lambda_1(S), max_i lambda_1(H_i),
            GGN sharpness, S).
        hessian_sharpness: top eigenvalue of the Hessian of the mean probe loss (None if not
            computed).
        ggn_sharpness: :math:`\lambda_1(K)/m`, top eigenvalue of the mean GGN (None if not
            computed).
        hvp_count: Hessian-vector products used (0 without Hessian sharpness).
        hessian_residual: Lanczos residual of the Hessian sharpness (nan if not computed).
        gradient_noise_scale: :math:`B_{simple}` (see module docstring).
        mean_gradient_sq_norm: :math:`|\bar g|^2 = \mathbf 1^\top P \mathbf 1 / m^2`, the
            squared norm of the gradient of the probe's mean loss (SAM's normaliser uses it).
        num_samples: m.
        num_params: number of parameters measured.
        seconds: wall time.
        sharpness_vector: top Hessian eigenvector (flat float64), for ``init_vector``.
        sigma_full: the rescaled off-diagonal full-data sigma when n > m, else None; biased
            (module docstring): use :func:`torch_coherence.estimate_sigma` for sigma_n.
        n: the data-set size sigma_full refers to (m when not given).
        factors: ``"exact"``, ``"topk"`` or ``"mc"``.
        clipped_eigenvalue: most negative output-Hessian eigenvalue clipped (callable losses).
        truncation_bound: for ``factors="topk"``, the bound reached on the per-token relative
            error :math:`\|\Lambda_t - B_tB_t^\top\|_2/\|\Lambda_t\|_2` (0.0 otherwise).
        gram: the block Gram (m, R, m, R) when it was formed (m R <= 1024, or
            ``return_gram=True``), else None; float64 for a float64 model, else float32
            (the engine's factor products were taken in float32, so its entries carry
            float32 rounding, and tools that check it for symmetry and semi-definiteness
            read that tolerance from its dtype).
        fallback_blocks: parameter or module name -> why its block was computed by the
            ``torch.func`` fallback instead of a layer rule (no rule, a parameter read outside
            its module, an input modified in place, no sample axis, or the self-check).
        rechecked_blocks: blocks the self-check found wrong and recomputed through the
            fallback, with their relative error before (empty when every rule was right).
        self_check_error: the self-check's largest relative error of any block of the final
            K against autograd (nan when ``self_check=0``; see
            :mod:`torch_coherence.curvature.selfcheck`).
        self_check_passes: backward passes the self-check used.
    """

    stats: CoherenceStats
    hessian_sharpness: float | None
    ggn_sharpness: float | None
    hvp_count: int
    hessian_residual: float
    gradient_noise_scale: float
    num_samples: int
    num_params: int
    seconds: float
    sharpness_vector: torch.Tensor | None
    sigma_full: float | None
    n: int
    factors: str
    clipped_eigenvalue: float
    gram: torch.Tensor | None
    truncation_bound: float = 0.0
    mean_gradient_sq_norm: float = math.nan
    fallback_blocks: dict[str, str] = field(default_factory=dict)
    rechecked_blocks: dict[str, float] = field(default_factory=dict)
    self_check_error: float = math.nan
    self_check_passes: int = 0


def _length(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 0
    if isinstance(x, dict):
        return _length(next(iter(x.values())))
    if isinstance(x, (tuple, list)):
        return _length(x[0]) if x else 0
    return len(x)


def _devices(x: Any) -> set[torch.device]:
    if isinstance(x, torch.Tensor):
        return {x.device}
    if isinstance(x, dict):
        return set().union(*(_devices(v) for v in x.values()))
    if isinstance(x, (tuple, list)):
        return set().union(*(_devices(v) for v in x)) if x else set()
    return set()


def _select_params(
    model: nn.Module, params: Sequence[str] | Sequence[torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        sel = {k: p for k, p in named.items() if p.requires_grad}
    else:
        sel = {}
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"params: {item!r} is not a parameter name of the model")
                sel[item] = named[item]
            else:
                hit = [k for k, p in named.items() if p is item]
                if not hit:
                    raise ValueError("params: a tensor that is not a parameter of the model")
                sel[hit[0]] = item
        sel = {k: p for k, p in sel.items() if p.requires_grad}
    if not sel:
        raise ValueError("model/params: no trainable parameters (all have requires_grad=False)")
    return sel


def _check_outputs(out: torch.Tensor) -> None:
    bad = ~torch.isfinite(out.detach()).reshape(out.shape[0], -1).all(1)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise NonFiniteError(f"model outputs are not finite for probe samples {idx[:20]}")


def _stats_large(
    facs: GramFactors, chunk: int, eig_method: str, tol: float, seed: int | None
) -> tuple[CoherenceStats, float]:
    """Coherence statistics without forming K: S and K_ii chunk-wise, lambda_1(K) by Lanczos."""
    m = facs.m
    S2 = torch.zeros(m, m, dtype=torch.float64)
    diag = []
    for s in range(0, m, chunk):
        I = slice(s, min(s + chunk, m))  # noqa: E741
        for t in range(s, m, chunk):
            J = slice(t, min(t + chunk, m))
            blk = facs.block(I, J)
            sq = blk.square().sum((1, 3))
            S2[I, J] = sq
            S2[J, I] = sq.T
            if s == t:
                idx = torch.arange(blk.shape[0])
                diag.append(blk[idx, :, idx, :])
    if not torch.isfinite(S2).all():
        bad = (~torch.isfinite(S2)).any(1).nonzero().flatten().tolist()
        raise FloatingPointError(f"non-finite curvature at probe samples {bad[:20]}")
    Kii = torch.cat(diag)
    sample = torch.linalg.eigvalsh(0.5 * (Kii + Kii.transpose(1, 2)))[:, -1]
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    v0 = torch.randn(m * facs.R, generator=gen, dtype=torch.float64)
    top = lanczos(facs.matvec, v0, tol=max(tol, 1e-10), max_iter=100, stop="value").value
    ggn = top / m
    return _finish(S2, sample, ggn, eig_method, tol), ggn


def _gram_stats(gram: torch.Tensor, dtype: torch.dtype, eig_method: str) -> CoherenceStats:
    """Coherence statistics of an engine Gram (m, R, m, R) of a model computing in ``dtype``.

    The engine takes factor products in the model's dtype, so K carries that dtype's rounding:
    the symmetry / PSD checks use its tolerance. Under ``"auto"`` lambda_1(K) of more than
    :data:`DENSE_EIG_MAX` rows comes from Lanczos (float64 products with K).
    """
    psd = default_tol(torch.float64 if dtype == torch.float64 else torch.float32)
    method = eig_method
    if method == "auto" and gram.shape[0] * gram.shape[1] > DENSE_EIG_MAX:
        method = "lanczos"
    return coherence_from_gram(gram, eig_method=method, psd_tol=psd)


def _sigma_full(stats: CoherenceStats, n: int) -> float:
    S = stats.S.to(torch.float64)
    m = S.shape[0]
    d = torch.diagonal(S).clone()
    scaled = (S - torch.diag(d)) * ((n - 1) / (m - 1)) + torch.diag(d)
    lam = top_eigenvalue(scaled, eig_method="auto", tol=1e-10, name="S").value
    return float(lam / stats.max_sample_sharpness)


def _noise_scale(facs_p: GramFactors, chunk: int) -> tuple[float, float]:
    """(B_simple, |g_m|^2) from the gradient factors without forming P: 1^T P 1 and tr P.

    |g_m|^2 = 1^T P 1 / m^2 is the squared norm of the probe's mean-loss gradient.
    """
    m = facs_p.m
    ones = torch.ones(m, dtype=torch.float64)
    total = float(ones @ facs_p.matvec(ones))
    tr = float(facs_p.diag_blocks(chunk).sum())
    g2 = (total - tr) / (m * (m - 1))
    trace_sigma = (tr - total / m) / (m - 1)
    return (trace_sigma / g2 if g2 > 0 else math.inf), total / (m * m)


def measure_curvature(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss: Any,
    *,
    n: int | None = None,
    factors: str = "exact",
    mc_samples: int = 1,
    factor_tol: float = 1e-2,
    params: Sequence[str] | Sequence[torch.Tensor] | None = None,
    chunk_size: int | None = None,
    sketch_dim: int | None = None,
    sharpness: str | None = "both",
    tol: float = 1e-4,
    max_hvps: int = 20,
    init_vector: torch.Tensor | None = None,
    eig_method: str = "auto",
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    seed: int | None = None,
    return_gram: bool = False,
    self_check: int = 2,
) -> CurvatureReport:
    r"""Coherence, sharpness and gradient noise scale of ``model`` on a probe batch.

    Args:
        model: any ``nn.Module``; evaluated in eval mode (BatchNorm running statistics,
            dropout off: per-sample curvature is undefined with batch statistics). Its
            parameters, buffers, ``.grad``, RNG states and modes are restored exactly.
        inputs: probe inputs (m, ...) or a dict/tuple batch for ``forward_fn``.
        targets: probe targets (m, ...).
        loss: see :mod:`torch_coherence.curvature.losses` (CE, NLL, MSE, BCEWithLogits or a
            per-sample callable).
        n: training-set size; when n > m the report carries ``sigma_full``.
        factors: ``"exact"`` (all C rows of B_i) or ``"mc"`` (``mc_samples`` sampled labels;
            unbiased for the mean GGN, but biased for sigma and max_i lambda_1(H_i) —
            docs/theory.md §3: on the digits MLP (m = 256) one sampled label gave sigma 25-27
            against the exact 223, max_i lambda_1(H_i) 21-23 against 4.1, and GGN
            sharpness 1.69-1.84 against 1.69).
            ``"topk"`` (cross-entropy / NLL): per token the classes with
            :math:`p_c > \text{factor_tol}\cdot\max_c p_c(1-p_c)` plus one remainder row,
            a factor with :math:`0 \preceq \Lambda_t - B_tB_t^\top \preceq` factor_tol
            :math:`\|\Lambda_t\|_2` (curvatures are lower bounds of the exact ones; the
            bound reached is ``report.truncation_bound``; see
            :mod:`torch_coherence.curvature.losses.sequence`). For sequence losses
            (logits (m, T, V)) ``"exact"`` has T V rows per sequence, ``"topk"`` about
            T (k + 1) and ``"mc"`` ``mc_samples`` (one sampled label per token per draw,
            summed over the sequence).
        mc_samples: sampled rows per sample for ``factors="mc"``.
        factor_tol: relative tolerance of ``factors="topk"``.
        params: parameter names or tensors to measure (default: all trainable ones);
            frozen ones are dropped.
        chunk_size: samples per chunk of the ``torch.func`` fallback and per block of the
            blockwise assembly of S (default: 32 for the fallback; blocks of at most 512
            rows). Peak memory grows with it.
        sketch_dim: k for a randomized Gram :math:`(A\Omega)(A\Omega)^\top` (unbiased for
            K, relative error ~ 1/sqrt(k); see :func:`.gram.sketch`); the gradient Gram
            stays exact. Each layer is projected as soon as its factors exist and have
            passed the self-check (:class:`.gram.SketchSink`), so the memory is that of the
            largest layer plus (m, R, k). Only worthwhile when k is far below the parameter
            count.
        sharpness: ``"both"``, ``"hessian"``, ``"ggn"`` or None.
        tol: relative eigenvalue accuracy of the Hessian Lanczos.
        max_hvps: at most this many Hessian-vector products.
        init_vector: warm start of the Hessian Lanczos (previous ``sharpness_vector``).
        eig_method: eigen-solver for lambda_1(S) and lambda_1(K) (see ``coherence_from_gram``).
        forward_fn: ``forward_fn(model, inputs) -> outputs`` for non-tensor batches.
        seed: seed of MC labels and Lanczos start vectors.
        return_gram: form the whole block Gram K and return it as ``report.gram`` even
            when m R > 1024 (needed by :func:`torch_coherence.dynamics.mean_square_rate`;
            costs (m R)^2 doubles plus temporaries).
        self_check: random coefficient vectors of the self-check of K against autograd (one
            backward pass each; :mod:`torch_coherence.curvature.selfcheck`); a block that
            fails it is recomputed through the ``torch.func`` fallback and named in
            ``report.rechecked_blocks``. 0 switches the check off.

    A ``torch.compile``d model (or submodule) is probed through the eager module it wraps
    (``_orig_mod``): the same parameters and function, but module hooks fire and the Hessian
    products can differentiate twice. Attention (``scaled_dot_product_attention``) runs with
    the math backend during the Hessian products, whose flash / efficient backward is not
    twice differentiable.

    Returns:
        A frozen :class:`CurvatureReport`.

    Raises:
        ValueError: length mismatch, m < 2, bad options, no trainable parameters, device
            mismatch. TypeError: unsupported loss. FloatingPointError: non-finite outputs or
            curvature (with the sample indices).
    """
    t0 = time.perf_counter()
    check_loss(loss)
    if factors not in ("exact", "topk", "mc"):
        raise ValueError(f"factors must be 'exact', 'topk' or 'mc', got {factors!r}")
    if factors == "topk" and not (isinstance(factor_tol, (int, float)) and factor_tol >= 0):
        raise ValueError(f"factor_tol must be a number >= 0, got {factor_tol!r}")
    if sharpness not in ("both", "hessian", "ggn", None):
        raise ValueError(f"sharpness must be 'both', 'hessian', 'ggn' or None, got {sharpness!r}")
    if sketch_dim is not None and (not isinstance(sketch_dim, int) or sketch_dim < 1):
        raise ValueError(f"sketch_dim must be a positive int or None, got {sketch_dim!r}")
    if factors == "mc" and (not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(return_gram, bool):
        raise ValueError(f"return_gram must be a bool, got {return_gram!r}")
    if isinstance(self_check, bool) or not isinstance(self_check, int) or self_check < 0:
        raise ValueError(f"self_check must be an int >= 0 (vectors), got {self_check!r}")
    m = _length(inputs)
    mt = _length(targets)
    if m != mt:
        raise ValueError(f"inputs and targets: lengths differ ({m} vs {mt})")
    if m < 2:
        raise ValueError(f"inputs: the probe needs at least 2 samples, got {m}")
    if n is not None and n < m:
        raise ValueError(f"n: the data-set size {n} is smaller than the probe size {m}")
    sel = _select_params(model, params)
    check_probe_model(model)
    pdev = {p.device for p in sel.values()}
    for name, x in (("inputs", inputs), ("targets", targets)):
        bad = {d for d in _devices(x) if d.type != next(iter(pdev)).type}
        if bad:
            raise ValueError(
                f"{name}: on {sorted(map(str, bad))} but the model is on "
                f"{sorted(map(str, pdev))}; move them to the model's device"
            )
    if forward_fn is None:  # (a batch for forward_fn may hold masks with -inf)
        check_probe_inputs(inputs)
    from .._state import preserved_state

    with preserved_state(model), eager_modules(model) as eager:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in sel.values():
            p.requires_grad_(True)
        fwd = Forward(eager, forward_fn)
        guards = embedding_id_guard(eager, m)
        try:
            with torch.no_grad():
                out = fwd(inputs)
        except RuntimeError as exc:
            err = forward_error(exc, inputs, eager)
            if err is exc:
                raise
            raise err from exc
        finally:
            for h in guards:
                h.remove()
        _check_outputs(out)
        check_targets(loss, out, targets)
        if factors == "exact":
            oc = output_curvature(loss, out, targets)
        elif factors == "topk":
            oc = truncated_curvature(loss, out, targets, float(factor_tol))
        else:
            gen = torch.Generator().manual_seed(0 if seed is None else seed)
            oc = sampled_curvature(loss, out, targets, mc_samples, gen)
        Bsq = oc.sqrt
        finite = is_finite(Bsq)
        if not finite.all():
            bad = (~finite).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite output curvature at probe samples {bad[:20]}")
        grads = output_gradients(loss, out, targets)
        R = Bsq.shape[2]
        ext = append_columns(Bsq, grads.unsqueeze(2))
        sink = None
        if sketch_dim is not None:
            gen_s = torch.Generator().manual_seed(1 if seed is None else seed + 1)
            sink = SketchSink(m, R, sketch_dim, gen_s)
        facs = gram_factors(
            eager,
            inputs,
            ext,
            sel,
            forward_fn=forward_fn,
            chunk_size=chunk_size,
            outputs_check=_check_outputs,
            check=self_check,
            seed=0 if seed is None else seed,
            accumulate=sketch_dim is None and (m * R <= DENSE_LIMIT or return_gram),
            sink=sink,
        )
        notes = facs.notes
        facs_g, facs_p = facs.split(R) if sink is None else sink.result()
        del facs
        gram = None
        if m * R <= DENSE_LIMIT or return_gram:
            gram = facs_g.full()
            if not torch.isfinite(gram).all():
                bad = (~torch.isfinite(gram)).flatten(1).any(1).nonzero().flatten().tolist()
                raise FloatingPointError(f"non-finite curvature at probe samples {bad[:20]}")
            stats = _gram_stats(gram, out.dtype, eig_method)
            ggn = stats.sharpness
            if out.dtype != torch.float64:  # carries float32 rounding: say so by its dtype
                gram = gram.to(torch.float32)
        else:
            chunk = chunk_size if chunk_size is not None else max(1, BLOCK_ROWS // R)
            lanczos_tol = 1e-10 if out.dtype == torch.float64 else 1e-7
            stats, ggn = _stats_large(facs_g, chunk, eig_method, lanczos_tol, seed)
        noise, grad_sq = _noise_scale(facs_p, chunk_size or BLOCK_ROWS)
        hess = None
        vec = None
        hvps = 0
        resid = math.nan
        if sharpness in ("both", "hessian"):
            from .sharpness import hessian_sharpness

            plist = list(sel.values())

            def loss_fn() -> torch.Tensor:
                return per_sample_losses(loss, fwd(inputs), targets).mean()

            with sdpa_kernel(SDPBackend.MATH):
                res = hessian_sharpness(
                    loss_fn, plist, tol=tol, max_hvps=max_hvps, init_vector=init_vector, seed=seed
                )
            hess, vec, hvps, resid = res.value, res.vector, res.hvp_count, res.residual
    sigma_full = _sigma_full(stats, n) if n is not None and n > m else None
    return CurvatureReport(
        stats=stats,
        hessian_sharpness=hess,
        ggn_sharpness=ggn if sharpness in ("both", "ggn") else None,
        hvp_count=hvps,
        hessian_residual=resid,
        gradient_noise_scale=noise,
        mean_gradient_sq_norm=grad_sq,
        num_samples=m,
        num_params=sum(p.numel() for p in sel.values()),
        seconds=time.perf_counter() - t0,
        sharpness_vector=vec,
        sigma_full=sigma_full,
        n=m if n is None else int(n),
        factors=factors,
        clipped_eigenvalue=oc.clipped,
        gram=gram,
        truncation_bound=oc.truncation,
        fallback_blocks=dict(notes.fallback),
        rechecked_blocks=dict(notes.rechecked),
        self_check_error=notes.check_error,
        self_check_passes=notes.check_passes,
    )
