"""Linearized-SGD simulator, §5.1 phase diagrams and the ``reproduce`` CLI."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from references import F64, section51_hessians

import torch_coherence as tc
from torch_coherence.cli import main
from torch_coherence.dynamics import (
    mean_square_rate,
    phase_diagram,
    section51_diagonals,
    simulate_linearized_sgd,
)
from torch_coherence.dynamics.simulate import _sample_batches


def test_section51_diagonals_match_the_reference_construction():
    for n, s in [(10, 1), (10, 4), (10, 10)]:
        D = section51_diagonals(n, s)
        assert torch.equal(torch.diag_embed(D), section51_hessians(n, s))
        stats = tc.coherence_from_hessians(torch.diag_embed(D))
        assert stats.sigma == pytest.approx(s)
        assert stats.sharpness == pytest.approx(2.0)


@pytest.mark.parametrize("sampling", ["bernoulli", "without_replacement"])
def test_batch_samplers_have_the_right_law(sampling):
    """Inclusion probability B/m; without replacement: exactly B, pairs B(B-1)/(m(m-1))."""
    gen = torch.Generator().manual_seed(0)
    T, m, b = 40000, 7, 3
    bs = torch.full((T,), float(b), dtype=F64)
    ind = _sample_batches(T, m, bs, bs.long(), sampling, gen, F64)
    p = ind.mean(0)
    se = math.sqrt(b / m * (1 - b / m) / T)
    assert (p - b / m).abs().max() < 5 * se
    pair = (ind[:, 0] * ind[:, 1]).mean()
    if sampling == "without_replacement":
        assert bool((ind.sum(1) == b).all())
        want = b * (b - 1) / (m * (m - 1))
    else:
        want = (b / m) ** 2
    assert abs(float(pair) - want) < 5 * math.sqrt(want / T)


def test_simulation_outcomes_follow_the_clear_cases():
    D = section51_diagonals(20, 2)
    div = simulate_linearized_sgd(D, 0.9, 1, kind="diagonal", seed=0, steps=400)
    assert div.outcomes == ("diverged",) * 5 and div.label == "diverged"
    conv = simulate_linearized_sgd(D, 0.3, 20, kind="diagonal", seed=0, steps=400)
    assert conv.label == "converged" and conv.converged_fraction == 1.0
    # full batch is gradient descent: eta lambda_1 = 2.2 > 2 diverges deterministically
    gd = simulate_linearized_sgd(D, 1.1, 20, kind="diagonal", seed=0, steps=400)
    assert gd.label == "diverged"
    assert gd.norms.shape == (5, 401)
    k = gd.steps_taken[0]
    assert gd.norms[0, k] >= 1e3 and math.isnan(float(gd.norms[0, k + 1]))


def test_dense_and_diagonal_paths_agree_in_law():
    """Same construction as Hessians (coefficient-space path) and as diagonals (fast path)."""
    D = section51_diagonals(12, 3)
    for lr, b in [(0.9, 1), (0.3, 12)]:
        fast = simulate_linearized_sgd(D, lr, b, kind="diagonal", seed=1, repeats=6)
        dense = simulate_linearized_sgd(torch.diag_embed(D), lr, b, seed=2, repeats=6)
        assert fast.label == dense.label


def test_typical_runs_diverge_where_the_growth_is_certain():
    """Random factors; eta above the GD limit diverges, tiny eta shrinks."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(6, 2, 9, generator=gen, dtype=F64)
    lam = float(torch.linalg.eigvalsh(torch.einsum("ncd,nce->de", A, A) / 6)[-1])
    hi = simulate_linearized_sgd(A, 2.5 / lam, 6, seed=0, steps=300)
    assert hi.label == "diverged"
    sam = simulate_linearized_sgd(A, 0.5 / lam, 3, seed=0, optimizer="sam", sam_rho=0.05)
    assert sam.label in ("converged", "undecided")


def test_phase_diagram_protocol_on_a_small_grid():
    pd = phase_diagram([0.8], [1, 5, 20], [1, 10, 100], steps=300, seed=0)
    rows = {(r["sigma"], r["B"]): r for r in pd.rows}
    assert len(rows) == 9
    for r in pd.rows:
        d = section51_diagonals(100, r["sigma"])
        assert r["rho"] == pytest.approx(mean_square_rate(d, 0.8, r["B"], kind="diagonal"))
        if r["theorem1_diverges"]:
            assert r["label"] == "diverged"
        assert r["theorem2_bound_holds"] == (r["rho"] < 1)  # exact boundary (Bernoulli)
    assert rows[(1, 1)]["theorem1_diverges"] and rows[(1, 1)]["label"] == "diverged"
    assert rows[(20, 100)]["label"] == "converged"
    agree = pd.agreement()
    assert agree["cells"] == 9 and agree["theorem1_diverged"] == 1.0


def test_phase_diagram_sam_and_noise_variants_run():
    for opt, extra in [("sam", {"sam_rho": 0.1}), ("noisy_sgd", {})]:
        pd = phase_diagram([0.8], [2], [1, 100], steps=200, optimizer=opt, **extra)
        labels = [r["label"] for r in pd.rows]
        assert labels[0] == "diverged"
        assert labels[1] == "converged"


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(repeats=0), ValueError, "repeats"),
        (dict(steps=1.5), TypeError, "steps"),
        (dict(grow=1.0), ValueError, "grow"),
        (dict(shrink=0.5), ValueError, "shrink"),
        (dict(optimizer="adam"), ValueError, "optimizer"),
        (dict(optimizer="sam"), ValueError, "sam_rho"),
        (dict(sampling="poisson"), ValueError, "sampling"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(batch_size=0.5), ValueError, "batch_size"),
        (dict(batch_size=1.5, sampling="without_replacement"), ValueError, "integer"),
        (dict(lr=-1.0), ValueError, "lr"),
    ],
)
def test_simulation_bad_input(kwargs, exc, match):
    args = dict(curvature=section51_diagonals(6, 2), lr=0.1, batch_size=2, kind="diagonal")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        simulate_linearized_sgd(**args)


def test_phase_diagram_bad_input():
    with pytest.raises(ValueError, match="sigmas"):
        phase_diagram([0.5], [101], [1])
    with pytest.raises(ValueError, match="optimizer"):
        phase_diagram([0.5], [1], [1], optimizer="adam")


def test_reproduce_cli_writes_csv_png_and_agreement(tmp_path, capsys):
    rc = main(["reproduce", "figure2", "--steps", "20", "--sampling", "bernoulli",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    with (tmp_path / "figure2.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60 * 100
    for col in ("sampling", "eta", "sigma", "B", "diverged_fraction", "label",
                "theorem1_diverges", "theorem2_bound_holds", "rho"):  # fmt: skip
        assert col in rows[0]
    assert (tmp_path / "figure2.png").stat().st_size > 1000
    assert (tmp_path / "figure2_agreement.csv").exists()
    assert "rho>1 == diverged" in capsys.readouterr().out


@pytest.mark.parametrize("sampling", ["bernoulli", "without_replacement"])
def test_section51_lyapunov_matches_enumeration(sampling):
    """max_a E log|j_a| by enumerating every batch of n = 7 samples (no package formulas)."""
    import itertools

    import numpy as np

    from torch_coherence.dynamics.phase import section51_lyapunov

    n = 7
    for s, lr, b in [(3, 0.8, 2), (1, 0.5, 1), (7, 0.3, 3), (2, 0.9, 5)]:
        D = section51_diagonals(n, s).numpy()
        logs = np.zeros(D.shape[1])
        if sampling == "bernoulli":
            p = b / n
            for x in itertools.product((0, 1), repeat=n):
                prob = p ** sum(x) * (1 - p) ** (n - sum(x))
                logs += prob * np.log(np.abs(1 - lr / b * np.array(x, float) @ D))
        else:
            subsets = list(itertools.combinations(range(n), b))
            for sub in subsets:
                logs += np.log(np.abs(1 - lr / b * D[list(sub)].sum(0))) / len(subsets)
        got = section51_lyapunov(n, s, lr, b, sampling)
        assert got == pytest.approx(float(logs.max()), rel=1e-12, abs=1e-12)
