"""Eigen-solvers against the dense symmetric eigensolver."""

from __future__ import annotations

import pytest
import torch
from references import F64

from torch_coherence import linalg


def random_psd(gen: torch.Generator, n: int, rank: int) -> torch.Tensor:
    X = torch.randn(n, rank, generator=gen, dtype=F64)
    return X @ X.T


@pytest.mark.parametrize("method", ["exact", "lanczos", "power", "auto"])
@pytest.mark.parametrize(("n", "rank"), [(1, 1), (2, 2), (50, 5), (120, 120)])
def test_top_eigenvalue_matches_eigvalsh(method: str, n: int, rank: int, gen) -> None:
    A = random_psd(gen, n, rank)
    ref = float(torch.linalg.eigvalsh(A)[-1])
    res = linalg.top_eigenvalue(A, eig_method=method)
    assert res.value == pytest.approx(ref, rel=1e-9)
    assert res.converged
    v = res.vector
    assert float(torch.linalg.vector_norm(A @ v - res.value * v)) <= 1e-6 * ref


def test_lanczos_needs_few_products_and_reports_residual(gen) -> None:
    A = random_psd(gen, 300, 300)
    res = linalg.lanczos(lambda x: A @ x, torch.ones(300, dtype=F64), tol=1e-8, max_iter=300)
    ref = float(torch.linalg.eigvalsh(A)[-1])
    assert res.value == pytest.approx(ref, rel=1e-12)
    assert res.matvecs < 100
    assert res.residual <= 1e-8 * ref


def test_lanczos_warm_start_from_eigenvector_is_immediate(gen) -> None:
    A = random_psd(gen, 80, 10)
    evals, evecs = torch.linalg.eigh(A)
    res = linalg.lanczos(lambda x: A @ x, evecs[:, -1], tol=1e-8)
    assert res.matvecs == 1
    assert res.value == pytest.approx(float(evals[-1]), rel=1e-12)


def test_lanczos_accepts_float32_operators(gen) -> None:
    A = random_psd(gen, 40, 40).float()
    res = linalg.lanczos(lambda x: A @ x.float(), torch.ones(40), tol=1e-5)
    assert res.value == pytest.approx(float(torch.linalg.eigvalsh(A.double())[-1]), rel=1e-5)


def test_power_iteration_finds_perron_root_of_nonnegative_matrix(gen) -> None:
    S = torch.rand(30, 30, generator=gen, dtype=F64)
    S = S + S.T
    res = linalg.power_iteration(lambda x: S @ x, torch.ones(30, dtype=F64))
    assert res.value == pytest.approx(float(torch.linalg.eigvalsh(S)[-1]), rel=1e-12)
    assert bool((res.vector > 0).all())


def test_non_convergence_warns(gen) -> None:
    A = torch.diag(torch.tensor([1.0, 0.999999, 0.5], dtype=F64))
    res = linalg.power_iteration(lambda x: A @ x, torch.ones(3, dtype=F64), max_iter=5)
    assert not res.converged
    with pytest.warns(RuntimeWarning, match="did not reach relative tolerance"):
        linalg.top_eigenvalue(A, eig_method="power", max_iter=5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eig_method must be one of"):
        linalg.top_eigenvalue(torch.eye(3), eig_method="svd")
    with pytest.raises(ValueError, match="must be a square matrix"):
        linalg.top_eigenvalue(torch.ones(2, 3))
    with pytest.raises(ValueError, match="v0 must be finite and non-zero"):
        linalg.lanczos(lambda x: x, torch.zeros(3))
    with pytest.raises(ValueError, match="v0 must be a non-empty 1-D tensor"):
        linalg.lanczos(lambda x: x, torch.ones(2, 2))
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        linalg.lanczos(lambda x: x, torch.ones(2), max_iter=0)
    with pytest.raises(ValueError, match="matvec returned 2 entries for a vector of 3"):
        linalg.lanczos(lambda x: x[:2], torch.ones(3))
    assert linalg.resolve_eig_method("auto", 10) == "exact"
    assert linalg.resolve_eig_method("auto", linalg.AUTO_EXACT_MAX + 1) == "lanczos"


def test_symmetric_eigh_falls_back_to_scipy_when_lapack_fails(monkeypatch):
    """A LinAlgError from torch's syevd is answered by SciPy's MRRR driver, same pairs."""
    from torch_coherence.linalg import symmetric_eigh

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    A = X @ X.T
    ref_w, _ = torch.linalg.eigh(A)

    def failing(_):
        raise torch.linalg.LinAlgError("syevd failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    w, V = symmetric_eigh(A)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(V @ torch.diag(w) @ V.T, A, rtol=1e-10, atol=1e-10)
    assert w.dtype == A.dtype


@pytest.mark.parametrize("max_iter", [1, 7, 40])
def test_lanczos_basis_is_one_buffer_and_never_copied(max_iter, gen, monkeypatch) -> None:
    """The Krylov basis is preallocated: no stack/cat of basis vectors per iteration.

    Stopped early (max_iter below convergence) the Ritz pair must still be consistent: the
    returned vector's Rayleigh quotient is the returned value.
    """
    A = random_psd(gen, 400, 60)
    copies = []
    for name in ("stack", "cat", "vstack"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            copies.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    res = linalg.lanczos(lambda x: A @ x, torch.ones(400, dtype=F64), tol=1e-12, max_iter=max_iter)
    monkeypatch.undo()
    assert copies == []
    assert res.matvecs == max_iter or (max_iter == 40 and res.converged)
    v = res.vector
    assert float(v @ A @ v) == pytest.approx(res.value, rel=1e-10)
    ref = float(torch.linalg.eigvalsh(A)[-1])
    assert res.value <= ref * (1 + 1e-12)
    if max_iter == 40:
        assert res.value == pytest.approx(ref, rel=1e-9)
