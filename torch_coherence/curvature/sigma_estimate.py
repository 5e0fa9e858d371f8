r"""Coherence sigma of the whole training set: exact, and estimated from a probe.

sigma is defined over all n training examples (``docs/theory.md §2, §6``):

.. math::

    \sigma_n = \lambda_1(S_n) / \max_{i \le n} \lambda_1(H_i), \qquad
    (S_n)_{ij} = \sqrt{\mathrm{tr}(H_i H_j)} = \|K_{ij}\|_F .

A probe of m examples gives :math:`\sigma_m`, which is not :math:`\sigma_n` (for aligned data
:math:`\lambda_1(S)` grows about linearly with the number of examples). Both parts of the ratio
are hard to estimate from a uniform probe: the numerator's Perron vector sits on the few
examples with the largest curvature, and the denominator is an extreme value over n. The
estimator here removes both problems with one O(n) pass over the data:

1. **Per-sample pass** (:func:`per_sample_curvature`): the diagonal Gram blocks
   :math:`K_{ii}` of every example (batched, O(n)), hence :math:`\lambda_1(H_i)` and
   :math:`\|H_i\|_F = S_{ii}` for all of them. The denominator :math:`\max_i \lambda_1(H_i)` is
   then exact (over the pass's examples).
2. **Probe drawn with probabilities proportional to** :math:`S_{ii}`: inclusion probabilities
   :math:`\pi_i = \min(1, c\, S_{ii})` with :math:`\sum_i \pi_i = m` (examples with
   :math:`\pi_i = 1` are always in), drawn by systematic sampling in a random order (fixed
   size m; Madow 1949). The probe's S is the principal submatrix of :math:`S_n` on the drawn
   examples.
3. **Horvitz-Thompson estimate of the numerator.** For any unit vector v,
   :math:`v^\top S_n v = \sum_{i \ne j} v_i v_j S_{ij} + \sum_i v_i^2 S_{ii}` is estimated
   without bias by :math:`\sum_{i \ne j \in s} v_i v_j S_{ij}/\pi_{ij} + \sum_{i\in s}
   v_i^2 S_{ii}/\pi_i`. With :math:`u_i = v_i/\sqrt{\pi_i}` this is :math:`u^\top M u` with

   .. math::

       M_{ii} = S_{ii}, \qquad M_{ij} = S_{ij}\, \frac{\sqrt{\pi_i \pi_j}}{\pi_{ij}}
       \quad (i \ne j),

   and :math:`\hat\lambda_1 = \lambda_1(M)`. For a uniform probe (:math:`\pi_i = m/n`,
   :math:`\pi_{ij} = m(m-1)/(n(n-1))`) the off-diagonal factor is :math:`(n-1)/(m-1)`: the
   "rescaled off-diagonal" estimator. For the PPS probe the pair probabilities are
   approximated by the same fixed-size form, :math:`\pi_{ij} \approx \pi_i\pi_j
   (m_r-1)\,n_r/(m_r(n_r-1))` among the :math:`m_r` non-certain probe examples
   (:math:`n_r = \sum 1/\pi_i` over them), and :math:`\pi_{ij} = \pi_i\pi_j` exactly when
   one of the two is taken with certainty.

Exact in the closed-form cases: identical rank-one H_i (S constant: M is the constant n x n
matrix's image, :math:`\hat\lambda_1 = n S_{11}`, sigma = n) and mutually orthogonal H_i (S
diagonal: sigma = 1).

Uncertainty: split halves. The probe is split at random into two halves, each a probe with
inclusion probabilities :math:`\pi/2` (a uniform one of m/2); with variance about
proportional to 1/m, :math:`\mathrm{Var}(\hat\sigma_m) \approx E(\hat\sigma_A -
\hat\sigma_B)^2/4`, averaged over ``splits`` random splits. It measures the spread over probe
draws, not a bias; the measured errors are in ``docs/estimates.md``.

Measured (``benchmarks/bench_estimates.py``, ``docs/estimates.md``, 5 draws each): on 7
model/data pairs with n = 1797-2000 (digits MLPs and CNN with CE, an MSE teacher-student
net, a BCE MLP) the PPS estimate at m = 256 was within 3% of the exact sigma_n in every
draw, at m = 64 within 16%; the rescaled estimator on a uniform probe with the probe's own
maximum was off by up to +187% (m = 64) and +81% (m = 256). With the pass on a sample of
2048 of n = 8000 the denominator is the maximum over that sample and sigma leans high (+1%
to +6% at m = 256), which the stderr does not include.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import top_eigenvalue
from .sharpness import data_batch, data_length, sample_indices

__all__ = [
    "PerSampleCurvature",
    "SigmaEstimate",
    "estimate_sigma",
    "exact_sigma",
    "per_sample_curvature",
    "pps_inclusion",
    "sigma_from_probe",
    "systematic_sample",
]


@dataclass(frozen=True)
class SigmaEstimate:
    """A coherence value for a data set of ``n`` examples, with its uncertainty.

    Attributes:
        value: the estimate of sigma_n.
        stderr: its standard error from split halves (0 for an exact value).
        n: the data-set size the value refers to.
        m: the number of examples whose pairs were used (``m == n``: exact).
        method: ``"exact"``, ``"pps"`` (probe drawn proportional to ||H_i||_F) or
            ``"uniform"`` (uniform probe, rescaled off-diagonal).
        lambda_S: the estimate of lambda_1(S_n).
        max_sample_sharpness: the denominator used, max_i lambda_1(H_i).
        max_over: how many examples that maximum was taken over.
        seconds: wall time.
    """

    value: float
    stderr: float
    n: int
    m: int
    method: str
    lambda_S: float = math.nan
    max_sample_sharpness: float = math.nan
    max_over: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class PerSampleCurvature:
    r"""Per-example curvature of a pass over the data (:func:`per_sample_curvature`).

    Attributes:
        indices: the example indices (sorted; all of ``range(n)`` or a uniform sample).
        sharpness: :math:`\lambda_1(H_i)` per example, float64.
        frobenius: :math:`\|H_i\|_F = S_{ii}` per example, float64.
        n: the data-set size.
        seconds: wall time of the pass.
    """

    indices: torch.Tensor
    sharpness: torch.Tensor
    frobenius: torch.Tensor
    n: int
    seconds: float


def _select(model: nn.Module, params: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    from .measure import _select_params

    return _select_params(model, params)


def per_sample_curvature(
    model: nn.Module,
    loss: object,
    data: object,
    *,
    max_samples: int | None = 2048,
    batch_size: int = 256,
    seed: int = 0,
    forward_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] | None = None,
) -> PerSampleCurvature:
    r""":math:`\lambda_1(H_i)` and :math:`\|H_i\|_F` of every example (or of a seeded sample).

    One pass in batches of ``batch_size``: the diagonal Gram blocks
    :math:`K_{ii} = B_i^\top J_i J_i^\top B_i` (R x R) by the engine's factor structure
    (:func:`torch_coherence.curvature.gram.gram_factors`), whose top eigenvalue is
    :math:`\lambda_1(H_i)` and whose Frobenius norm is :math:`\|H_i\|_F` (``docs/theory.md
    §3``). Cost O(n), unlike :math:`S_n`, which needs all n^2 pairs. All examples when
    ``n <= max_samples`` (None: always), else a uniform sample drawn by a private generator.
    Model state, modes and RNGs are restored exactly (eval mode inside).
    """
    from .._state import preserved_state
    from .gram import Forward, gram_factors
    from .losses import check_loss, output_curvature

    t0 = time.perf_counter()
    check_loss(loss)
    n = data_length(data)
    if n < 1:
        raise ValueError("data: the data set is empty")
    idx = sample_indices(n, max_samples, seed)
    sel = _select(model, params)
    device = next(iter(sel.values())).device
    lam, fro = [], []
    with preserved_state(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in sel.values():
            p.requires_grad_(True)
        fwd = Forward(model, forward_fn)
        for chunk in torch.split(idx, batch_size):
            x, y = data_batch(data, chunk, device)
            with torch.no_grad():
                out = fwd(x)
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError("model outputs are not finite on the data set")
            B = output_curvature(loss, out, y).sqrt
            facs = gram_factors(model, x, B, sel, forward_fn=forward_fn)
            Kii = facs.diag_blocks(max(1, 512 // facs.R)).cpu()
            Kii = 0.5 * (Kii + Kii.transpose(1, 2))
            lam.append(torch.linalg.eigvalsh(Kii)[:, -1])
            fro.append(Kii.square().sum((1, 2)).sqrt())
    return PerSampleCurvature(idx, torch.cat(lam), torch.cat(fro), n, time.perf_counter() - t0)


def pps_inclusion(sizes: torch.Tensor, m: int) -> torch.Tensor:
    r"""Inclusion probabilities :math:`\pi_i = \min(1, c\,s_i)` with :math:`\sum_i \pi_i = m`.

    ``c`` by bisection; examples whose size would give :math:`\pi_i > 1` are taken with
    certainty. Sizes must be non-negative with at least m positive ones (zero-size examples
    get a tiny floor so that every example can be drawn).
    """
    s = sizes.detach().to(torch.float64).cpu()
    if s.dim() != 1 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("sizes must be a 1-D tensor of finite non-negative numbers")
    N = s.numel()
    if not 1 <= m <= N:
        raise ValueError(f"m must lie in [1, {N}], got {m}")
    if m == N:
        return torch.ones(N, dtype=torch.float64)
    s = s.clamp_min(1e-12 * max(float(s.max()), 1e-300))
    lo, hi = 0.0, float(m) / float(s.min())
    for _ in range(200):
        c = 0.5 * (lo + hi)
        if float((c * s).clamp(max=1.0).sum()) > m:
            hi = c
        else:
            lo = c
    return (hi * s).clamp(max=1.0)


def systematic_sample(pi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fixed-size sample with inclusion probabilities ``pi`` (sum m): systematic sampling
    over a random order (Madow 1949). Returns sorted indices."""
    N = pi.numel()
    perm = torch.randperm(N, generator=generator)
    cs = torch.cumsum(pi[perm], 0)
    m = round(float(cs[-1]))
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    points = u + torch.arange(m, dtype=torch.float64)
    pos = torch.searchsorted(cs, points).clamp(max=N - 1)
    return perm[pos].unique()


def _lambda_hat(S: torch.Tensor, n: int, pi: torch.Tensor | None) -> float:
    m = S.shape[0]
    d = torch.diagonal(S).clone()
    if pi is None:  # uniform fixed-size probe: exact pair probabilities
        pi = torch.full((m,), m / n, dtype=torch.float64)
    w = pi.rsqrt()
    M = S * w[:, None] * w[None, :]
    # fixed size: pi_ij ~ pi_i pi_j (m_r - 1) n_r / (m_r (n_r - 1)) among the non-certain
    # examples (exact for a uniform probe), pi_ij = pi_i pi_j when one of them is certain
    rand = pi < 1
    m_r = int(rand.sum())
    n_r = float(pi[rand].reciprocal().sum()) if m_r else 0.0
    if m_r > 1 and n_r > 1:
        kappa = m_r * (n_r - 1) / ((m_r - 1) * n_r)
        both = rand[:, None] & rand[None, :]
        M = torch.where(both, M * kappa, M)
    M = M - torch.diag(torch.diagonal(M)) + torch.diag(d)
    return top_eigenvalue(M, eig_method="auto", tol=1e-10, name="S").value


def sigma_from_probe(
    S: torch.Tensor,
    n: int,
    max_sample_sharpness: float,
    *,
    inclusion: torch.Tensor | None = None,
    max_over: int | None = None,
    splits: int = 8,
    seed: int = 0,
) -> SigmaEstimate:
    r"""sigma_n estimated from a probe's S (Horvitz-Thompson numerator; see module docstring).

    Args:
        S: the probe's (m, m) matrix :math:`S_{ij} = \|K_{ij}\|_F` (e.g. ``report.stats.S``).
        n: the data-set size the estimate is for.
        max_sample_sharpness: the denominator :math:`\max_i \lambda_1(H_i)`: best the maximum
            over all n examples (:func:`per_sample_curvature`); the probe's own maximum
            underestimates it and biases sigma upwards.
        inclusion: each probe example's inclusion probability :math:`\pi_i` (None: a uniform
            probe, :math:`\pi = m/n`, the rescaled off-diagonal estimator).
        max_over: how many examples the maximum was taken over (for the record).
        splits: random split-halves for the standard error (0: none, stderr nan).
        seed: seed of the splits (a private generator).

    Returns:
        :class:`SigmaEstimate` with ``method`` ``"uniform"`` or ``"pps"``.
    """
    S = torch.as_tensor(S).detach().to(torch.float64).cpu()
    if S.dim() != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 2:
        raise ValueError(f"S must be a square (m, m) matrix with m >= 2, got {tuple(S.shape)}")
    m = S.shape[0]
    if isinstance(n, bool) or not isinstance(n, int) or n < m:
        raise ValueError(f"n must be an int >= m = {m}, got {n!r}")
    den = float(max_sample_sharpness)
    if not (den > 0 and math.isfinite(den)):
        raise ValueError(f"max_sample_sharpness must be finite and > 0, got {den}")
    pi = None
    if inclusion is not None:
        pi = torch.as_tensor(inclusion).detach().to(torch.float64).cpu().reshape(-1)
        if pi.numel() != m or not bool(((pi > 0) & (pi <= 1)).all()):
            raise ValueError(f"inclusion must hold m = {m} probabilities in (0, 1]")
    t0 = time.perf_counter()
    lam = _lambda_hat(S, n, pi)
    stderr = math.nan
    if splits > 0 and m >= 4:
        gen = torch.Generator().manual_seed(seed)
        sq = []
        for _ in range(splits):
            perm = torch.randperm(m, generator=gen)
            a, b = perm[: m // 2], perm[m // 2 :]
            ea = _lambda_hat(S[a][:, a], n, None if pi is None else pi[a] / 2)
            eb = _lambda_hat(S[b][:, b], n, None if pi is None else pi[b] / 2)
            sq.append((ea - eb) ** 2 / 4)
        stderr = math.sqrt(sum(sq) / len(sq)) / den
    return SigmaEstimate(
        value=lam / den,
        stderr=stderr,
        n=n,
        m=m,
        method="uniform" if pi is None else "pps",
        lambda_S=lam,
        max_sample_sharpness=den,
        max_over=m if max_over is None else int(max_over),
        seconds=time.perf_counter() - t0,
    )


def estimate_sigma(
    model: nn.Module,
    loss: object,
    data: object,
    *,
    m: int = 256,
    max_samples: int | None = 2048,
    batch_size: int = 256,
    seed: int = 0,
    splits: int = 8,
    forward_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] | None = None,
) -> SigmaEstimate:
    r"""sigma_n of the whole training set from one O(n) pass and a PPS probe of m examples.

    Steps (module docstring): :func:`per_sample_curvature` over all examples (or a uniform
    sample of ``max_samples`` when n is larger), inclusion probabilities proportional to
    :math:`\|H_i\|_F` (:func:`pps_inclusion`), a systematic sample of m examples, their S by
    :func:`torch_coherence.measure_curvature`, and :func:`sigma_from_probe` with the
    denominator from the pass. For a sampled pass the inclusion probabilities are those of the
    two phases, :math:`(N/n)\pi_i`, and the maximum is over the N examples of the pass (it
    can only underestimate the maximum over n, so sigma leans high).

    Args:
        model, loss, data: as for :func:`torch_coherence.curvature.dataset_sharpness`.
        m: probe size (pairs are computed among these m examples: cost O(m^2)).
        max_samples: the per-sample pass covers all examples up to this many.
        batch_size: examples per batch of the per-sample pass.
        seed: seed of the pass's sample, the probe draw and the splits (private generators).
        splits: split halves for the standard error.
        forward_fn, params: as for :func:`torch_coherence.measure_curvature`.

    Returns:
        :class:`SigmaEstimate` (``method="pps"``; ``"exact"`` when the pass covers at most m
        examples, which are then all taken).
    """
    from .measure import measure_curvature

    t0 = time.perf_counter()
    if isinstance(m, bool) or not isinstance(m, int) or m < 4:
        raise ValueError(f"m must be an int >= 4, got {m!r}")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 0:
        raise ValueError(f"splits must be an int >= 0, got {splits!r}")
    n = data_length(data)
    sweep = per_sample_curvature(
        model,
        loss,
        data,
        max_samples=max_samples,
        batch_size=batch_size,
        seed=seed,
        forward_fn=forward_fn,
        params=params,
    )
    N = sweep.indices.numel()
    take = min(m, N)
    pi = pps_inclusion(sweep.frobenius, take)
    pos = systematic_sample(pi, torch.Generator().manual_seed(seed + 1))
    idx = sweep.indices[pos]
    x, y = data_batch(data, idx, next(iter(_select(model, params).values())).device)
    rep = measure_curvature(model, x, y, loss, sharpness=None, forward_fn=forward_fn, params=params)
    den = float(sweep.sharpness.max())
    if N == n and take == N:
        lam = rep.stats.lambda_S
        return SigmaEstimate(lam / den, 0.0, n, n, "exact", lam, den, N, time.perf_counter() - t0)
    est = sigma_from_probe(
        rep.stats.S, n, den, inclusion=pi[pos] * (N / n), max_over=N, splits=splits, seed=seed
    )
    return SigmaEstimate(
        est.value, est.stderr, n, est.m, "pps", est.lambda_S, den, N, time.perf_counter() - t0
    )


def exact_sigma(
    model: nn.Module,
    loss: object,
    data: object,
    *,
    forward_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] | None = None,
    return_S: bool = False,
) -> SigmaEstimate | tuple[SigmaEstimate, torch.Tensor]:
    r"""sigma_n of all n examples by the streaming engine: all n^2 pairs, O(n^2) cost.

    :func:`torch_coherence.measure_curvature` on the whole data set with ``sharpness=None``;
    above m R = 1024 rows the block Gram is never formed and S (n x n, float64) is assembled
    block by block. Measured for n = 1797 (1 thread): 2-24 s (``docs/estimates.md``).
    With ``return_S=True`` also returns S_n.
    """
    from .measure import measure_curvature

    t0 = time.perf_counter()
    n = data_length(data)
    x, y = data_batch(data, torch.arange(n), next(iter(_select(model, params).values())).device)
    rep = measure_curvature(model, x, y, loss, sharpness=None, forward_fn=forward_fn, params=params)
    st = rep.stats
    est = SigmaEstimate(
        st.sigma,
        0.0,
        n,
        n,
        "exact",
        st.lambda_S,
        st.max_sample_sharpness,
        n,
        time.perf_counter() - t0,
    )
    return (est, st.S) if return_S else est
