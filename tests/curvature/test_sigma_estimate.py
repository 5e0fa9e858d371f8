"""Full-data sigma: exact values, the probe estimators and their standard errors."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from references import hessians_from_factors, random_factors, reference_coherence
from torch import nn

from torch_coherence import coherence_from_factors
from torch_coherence.curvature.sigma_estimate import (
    SigmaEstimate,
    estimate_sigma,
    exact_sigma,
    per_sample_curvature,
    pps_inclusion,
    sigma_from_probe,
    systematic_sample,
)

F64 = torch.float64


def population_S(gen: torch.Generator, n: int = 300, C: int = 2, d: int = 12):
    """S_n and per-sample sharpness of random low-rank factors with a common direction."""
    A = random_factors(gen, n, C, d)
    A = A + 0.8 * torch.randn(1, 1, d, generator=gen, dtype=F64)  # aligned part
    A = A * (1 + 3 * torch.rand(n, 1, 1, generator=gen, dtype=F64) ** 4)  # heavy-ish tail
    stats = coherence_from_factors(A)
    lam = torch.linalg.eigvalsh(hessians_from_factors(A))[:, -1]
    return stats.S, lam, stats.sigma


# ------------------------------------------------------------------ closed-form cases
@pytest.mark.parametrize("m", [4, 10, 37])
@pytest.mark.parametrize("n", [40, 1000])
def test_identical_rank_one_hessians_give_n(m: int, n: int) -> None:
    S = torch.full((m, m), 2.5, dtype=F64)  # S_ij = ||h||^2 for H_i = h h^T, ||h||^2 = 2.5
    est = sigma_from_probe(S, n, 2.5)
    assert isinstance(est, SigmaEstimate)
    assert est.value == pytest.approx(n, rel=1e-12)
    assert (est.n, est.m, est.method) == (n, m, "uniform")
    assert est.stderr == pytest.approx(0.0, abs=1e-9 * n)  # every half says n too
    equal = torch.full((m,), m / n, dtype=F64)  # a PPS design with equal probabilities
    assert sigma_from_probe(S, n, 2.5, inclusion=equal).value == pytest.approx(n, rel=1e-12)


@pytest.mark.parametrize("inclusion", [None, "pps"])
def test_orthogonal_hessians_give_one(inclusion) -> None:
    m, n = 12, 500
    S = torch.diag(torch.full((m,), 3.0, dtype=F64))
    pi = None if inclusion is None else torch.linspace(0.01, 1.0, m, dtype=F64)
    est = sigma_from_probe(S, n, 3.0, inclusion=pi)
    assert est.value == pytest.approx(1.0, rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


def test_uniform_estimator_is_the_rescaled_off_diagonal_one() -> None:
    gen = torch.Generator().manual_seed(1)
    S, lam, _ = population_S(gen, n=60)
    m, n = 20, 60
    Sm = S[:m, :m]
    d = torch.diag(torch.diagonal(Sm))
    ref = torch.linalg.eigvalsh(d + (Sm - d) * (n - 1) / (m - 1))[-1]
    est = sigma_from_probe(Sm, n, float(lam.max()))
    assert est.lambda_S == pytest.approx(float(ref), rel=1e-10)


def test_whole_population_is_exact() -> None:
    """m = n with all inclusion probabilities 1: M = S_n, the estimate is sigma_n."""
    gen = torch.Generator().manual_seed(2)
    S, lam, sigma = population_S(gen, n=50)
    ones = torch.ones(50, dtype=F64)
    for pi in (None, ones):
        est = sigma_from_probe(S, 50, float(lam.max()), inclusion=pi)
        assert est.value == pytest.approx(sigma, rel=1e-9)


# --------------------------------------------------------------- sampling design
def test_pps_inclusion_sums_to_m_and_caps_at_one() -> None:
    sizes = torch.tensor([100.0, 50.0] + [1.0] * 98, dtype=F64)
    pi = pps_inclusion(sizes, 10)
    assert float(pi.sum()) == pytest.approx(10.0, rel=1e-9)
    assert pi[0] == 1.0 and pi[1] == 1.0  # certainty units
    assert torch.allclose(pi[2:], pi[2])  # the rest proportional to size
    with pytest.raises(ValueError, match="m must lie"):
        pps_inclusion(sizes, 101)
    with pytest.raises(ValueError, match="sizes"):
        pps_inclusion(-sizes, 3)


def test_systematic_sample_has_fixed_size_and_the_inclusion_probabilities() -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = torch.rand(40, generator=gen, dtype=F64) ** 3 + 0.01
    pi = pps_inclusion(sizes, 8)
    counts = torch.zeros(40, dtype=F64)
    state = torch.get_rng_state()
    draws = 4000
    for s in range(draws):
        idx = systematic_sample(pi, torch.Generator().manual_seed(s))
        assert idx.numel() == 8 and idx.unique().numel() == 8
        counts[idx] += 1
    assert torch.equal(torch.get_rng_state(), state)  # private generators only
    se = (pi * (1 - pi) / draws).sqrt().clamp_min(1e-3)
    assert float(((counts / draws - pi) / se).abs().max()) < 4.5


def test_pps_estimate_is_close_and_stderr_tracks_the_spread() -> None:
    """On a synthetic population: PPS probes (the estimate_sigma design) and uniform ones."""
    gen = torch.Generator().manual_seed(4)
    S, lam, sigma = population_S(gen, n=400)
    n, den = 400, float(lam.max())
    pi_all = pps_inclusion(torch.diagonal(S), 64)
    for design in ("pps", "uniform"):
        vals, ses = [], []
        for seed in range(30):
            g = torch.Generator().manual_seed(100 + seed)
            if design == "pps":
                idx = systematic_sample(pi_all, g)
                est = sigma_from_probe(S[idx][:, idx], n, den, inclusion=pi_all[idx], seed=seed)
            else:
                idx = torch.randperm(n, generator=g)[:64]
                est = sigma_from_probe(S[idx][:, idx], n, den, seed=seed)
            vals.append(est.value)
            ses.append(est.stderr)
        spread = statistics.pstdev(vals)
        bias = abs(statistics.mean(vals) - sigma)
        assert bias < 0.05 * sigma + 2 * spread / math.sqrt(30), (design, bias, spread)
        assert 0.5 < statistics.mean(ses) / spread < 2.0, (design, statistics.mean(ses), spread)
    # more examples, smaller standard error
    idx = systematic_sample(pps_inclusion(torch.diagonal(S), 256), torch.Generator().manual_seed(0))
    big = sigma_from_probe(
        S[idx][:, idx], n, den, inclusion=pps_inclusion(torch.diagonal(S), 256)[idx]
    )
    assert big.stderr < statistics.mean(ses)


def test_sigma_from_probe_errors_name_the_argument() -> None:
    S = torch.eye(4, dtype=F64)
    with pytest.raises(ValueError, match="n must be"):
        sigma_from_probe(S, 3, 1.0)
    with pytest.raises(ValueError, match="S must be"):
        sigma_from_probe(torch.ones(3, 4), 10, 1.0)
    with pytest.raises(ValueError, match="max_sample_sharpness"):
        sigma_from_probe(S, 10, 0.0)
    with pytest.raises(ValueError, match="inclusion"):
        sigma_from_probe(S, 10, 1.0, inclusion=torch.zeros(4))


# --------------------------------------------------------------- model-level functions
def linear_problem(kind: str, n: int = 40):
    """Linear model, MSE: H_i = 2 x_i x_i^T. Identical inputs (sigma = n) or orthogonal
    inputs e_i (sigma = 1)."""
    torch.manual_seed(0)
    model = nn.Linear(n, 1, bias=False).to(F64)
    if kind == "identical":
        X = torch.randn(1, n, dtype=F64).expand(n, n).clone()
    else:
        X = torch.eye(n, dtype=F64)
    return model, nn.MSELoss(), X, torch.randn(n, 1, dtype=F64)


@pytest.mark.parametrize(("kind", "sigma"), [("identical", 40.0), ("orthogonal", 1.0)])
def test_estimate_and_exact_sigma_in_the_closed_form_cases(kind: str, sigma: float) -> None:
    model, loss, X, Y = linear_problem(kind)
    ex = exact_sigma(model, loss, (X, Y))
    assert ex.value == pytest.approx(sigma, rel=1e-9) and (ex.n, ex.m, ex.stderr) == (40, 40, 0)
    est = estimate_sigma(model, loss, (X, Y), m=8)
    assert est.method == "pps" and (est.n, est.m, est.max_over) == (40, 8, 40)
    assert est.value == pytest.approx(sigma, rel=1e-9)
    assert est.stderr == pytest.approx(0.0, abs=1e-9 * sigma)


def tiny_mlp_problem(n: int = 120):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    X = torch.randn(n, 4, generator=gen, dtype=F64)
    Y = torch.randint(0, 3, (n,), generator=gen)
    with torch.no_grad():
        model(X * 2)  # running statistics
    return model, nn.CrossEntropyLoss(), X, Y


def test_per_sample_curvature_matches_dense_per_sample_hessians() -> None:
    from curvature.curv_cases import dense_ggn

    model, loss, X, Y = tiny_mlp_problem(30)
    sweep = per_sample_curvature(model, loss, (X, Y), batch_size=7)
    model.eval()
    H = hessians_from_factors(dense_ggn(model, X, Y, loss))
    model.train()
    assert torch.allclose(sweep.sharpness, torch.linalg.eigvalsh(H)[:, -1], rtol=1e-9)
    assert torch.allclose(sweep.frobenius, H.flatten(1).norm(dim=1), rtol=1e-9)
    assert reference_coherence(H.numpy()).max_sample_sharpness == pytest.approx(
        float(sweep.sharpness.max()), rel=1e-9
    )


def test_estimate_sigma_restores_state_and_is_reproducible() -> None:
    model, loss, X, Y = tiny_mlp_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = estimate_sigma(model, loss, (X, Y), m=32, seed=1)
    b = estimate_sigma(model, loss, (X, Y), m=32, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert a.value == b.value and a.stderr == b.stderr
    ex = exact_sigma(model, loss, (X, Y))
    assert abs(a.value - ex.value) < max(0.25 * ex.value, 4 * a.stderr)
    # a probe as large as the data set is the exact value
    full = estimate_sigma(model, loss, (X, Y), m=120)
    assert full.method == "exact" and full.value == pytest.approx(ex.value, rel=1e-9)


def test_sampled_pass_uses_two_phase_probabilities() -> None:
    """n > max_samples: the pass covers a sample, the maximum is over it (max_over)."""
    model, loss, X, Y = tiny_mlp_problem()
    est = estimate_sigma(model, loss, (X, Y), m=16, max_samples=60)
    assert (est.n, est.m, est.max_over) == (120, 16, 60)
    ex = exact_sigma(model, loss, (X, Y))
    assert est.max_sample_sharpness <= ex.max_sample_sharpness
    assert 0.3 * ex.value < est.value < 3 * ex.value


def test_estimate_sigma_errors_name_the_argument() -> None:
    model, loss, X, Y = tiny_mlp_problem(20)
    with pytest.raises(ValueError, match="m must be"):
        estimate_sigma(model, loss, (X, Y), m=2)
    with pytest.raises(ValueError, match="splits"):
        estimate_sigma(model, loss, (X, Y), splits=-1)
    with pytest.raises(TypeError, match="data must be"):
        estimate_sigma(model, loss, object())


def test_a_dataset_of_pairs_gives_the_same_estimate_as_tensors() -> None:
    from torch.utils.data import TensorDataset

    model, loss, X, Y = tiny_mlp_problem(50)
    a = estimate_sigma(model, loss, (X, Y), m=16, seed=2)
    b = estimate_sigma(model, loss, TensorDataset(X, Y), m=16, seed=2, batch_size=9)
    assert b.value == pytest.approx(a.value, rel=1e-9)
    assert b.stderr == pytest.approx(a.stderr, rel=1e-9)
