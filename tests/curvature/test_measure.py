"""measure_curvature end to end: sharpness, state safety, losses, options, bad input, MC."""

from __future__ import annotations

import math

import pytest
import torch
from curvature.curv_cases import dense_ggn, mlp
from torch import nn
from torch.func import functional_call, hessian

from torch_coherence.coherence import coherence_from_hessians
from torch_coherence.curvature import CurvatureReport, measure_curvature

M = 8


def _data(gen, m=M, c=3):
    x = torch.randn(m, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (m,), generator=gen)
    return x, y


def test_sharpness_against_dense_hessian_and_ggn(gen):
    torch.manual_seed(1)
    # (torch.func.hessian through nn.LayerNorm gave an asymmetric, wrong matrix in torch 2.13 -
    # finite differences agree with double backward - so the dense reference uses an MLP)
    model = mlp().double()
    x, y = _data(gen)
    loss = nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return loss(functional_call(model, p, (x,)), y)

    Hd = hessian(f)(params)
    d = sum(p.numel() for p in params.values())
    H = torch.cat(
        [
            torch.cat([Hd[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1)
            for a in names
        ]
    )
    assert H.shape == (d, d)
    rep = measure_curvature(model, x, y, loss, tol=1e-10, max_hvps=d, seed=0)
    assert isinstance(rep, CurvatureReport)
    assert rep.hessian_sharpness == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)
    A = dense_ggn(model, x, y, loss)
    ggn = (A.transpose(1, 2) @ A).mean(0)
    assert rep.ggn_sharpness == pytest.approx(float(torch.linalg.eigvalsh(ggn)[-1]), rel=1e-9)
    assert 0 < rep.hvp_count <= d and rep.sharpness_vector.shape == (d,)
    assert rep.num_samples == M and rep.n == M and rep.sigma_full is None and rep.seconds > 0
    # warm start from the returned vector needs fewer products
    warm = measure_curvature(model, x, y, loss, tol=1e-6, init_vector=rep.sharpness_vector)
    cold = measure_curvature(model, x, y, loss, tol=1e-6, seed=3)
    assert warm.hvp_count < cold.hvp_count
    none = measure_curvature(model, x, y, loss, sharpness=None)
    assert none.hessian_sharpness is None and none.ggn_sharpness is None and none.hvp_count == 0


class BNDrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3)
        )

    def forward(self, x):
        return self.net(x)


def test_state_bit_identical_and_eval_mode(gen):
    torch.manual_seed(0)
    model = BNDrop().double()
    x, y = _data(gen)
    model.train()
    model(x).sum().backward()  # .grad set, running stats moved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    rep = measure_curvature(model, x, y, nn.CrossEntropyLoss())
    assert model.training and all(mod.training for mod in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=False))
    assert torch.equal(torch.get_rng_state(), rng)
    # eval-mode reference: BN running statistics, no dropout (deterministic)
    model.eval()
    A = dense_ggn(model, x, y, nn.CrossEntropyLoss())
    model.train()
    assert rep.stats.sigma == pytest.approx(
        coherence_from_hessians(A.transpose(1, 2) @ A).sigma, rel=1e-8
    )


def test_nll_model_equals_ce_model(gen):
    torch.manual_seed(0)
    model = mlp().double()
    x, y = _data(gen)
    logsm = nn.Sequential(model, nn.LogSoftmax(1))
    a = measure_curvature(model, x, y, nn.CrossEntropyLoss())
    b = measure_curvature(logsm, x, y, nn.NLLLoss())
    assert b.stats.sigma == pytest.approx(a.stats.sigma, rel=1e-9)
    assert b.ggn_sharpness == pytest.approx(a.ggn_sharpness, rel=1e-9)
    assert b.hessian_sharpness == pytest.approx(a.hessian_sharpness, rel=1e-3)


def test_callable_loss_and_forward_fn(gen):
    torch.manual_seed(0)
    model = mlp().double()
    x, y = _data(gen)

    def ce_one(o, t):
        return nn.functional.cross_entropy(o[None], t[None])

    a = measure_curvature(model, x, y, nn.CrossEntropyLoss())
    b = measure_curvature(model, x, y, ce_one)
    assert b.stats.sigma == pytest.approx(a.stats.sigma, rel=1e-7)
    assert b.hessian_sharpness == pytest.approx(a.hessian_sharpness, rel=1e-3)
    assert b.clipped_eigenvalue <= 0 and b.clipped_eigenvalue > -1e-12
    c = measure_curvature(
        model, {"x": x}, y, nn.CrossEntropyLoss(), forward_fn=lambda mdl, batch: mdl(batch["x"])
    )
    assert c.stats.sigma == pytest.approx(a.stats.sigma, rel=1e-12)
    torch.testing.assert_close(c.gram, a.gram)


def test_float32_model_runs_in_its_dtype(gen):
    torch.manual_seed(0)
    model = mlp()
    x, y = _data(gen)
    a = measure_curvature(model, x.float(), y, nn.CrossEntropyLoss())
    b = measure_curvature(
        mlp().double().load_state_dict(model.state_dict()) and model.double(),
        x,
        y,
        nn.CrossEntropyLoss(),
    )
    assert a.gram.dtype == torch.float32 and b.gram.dtype == torch.float64  # their rounding
    assert a.stats.sigma == pytest.approx(b.stats.sigma, rel=1e-4)


def test_bad_input(gen):
    model = mlp().double()
    x, y = _data(gen)
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="inputs and targets"):
        measure_curvature(model, x, y[:-1], ce)
    with pytest.raises(ValueError, match="at least 2"):
        measure_curvature(model, x[:1], y[:1], ce)
    with pytest.raises(TypeError, match=r"CrossEntropyLoss.*callable"):
        measure_curvature(model, x, y, nn.L1Loss())
    with pytest.raises(ValueError, match="no trainable"):
        frozen = mlp().double().requires_grad_(False)
        measure_curvature(frozen, x, y, ce)
    bad = x.clone()
    bad[3, 0] = math.nan
    bad[5, 1] = math.nan
    with pytest.raises(FloatingPointError, match=r"\[3, 5\]"):
        measure_curvature(model, bad, y, ce)
    with pytest.raises(ValueError, match="params"):
        measure_curvature(model, x, y, ce, params=["nope"])
    with pytest.raises(ValueError, match="factors"):
        measure_curvature(model, x, y, ce, factors="approx")
    with pytest.raises(ValueError, match="n:"):
        measure_curvature(model, x, y, ce, n=3)
    with pytest.raises(ValueError, match="meta"):
        measure_curvature(model, x.to("meta"), y, ce)


def test_mc_factors_unbiased_for_the_gram_but_not_for_sigma(gen):
    """Unbiased: tr H_i and, for i != j, S_ij^2 = tr(H_i H_j); biased: sigma, max lambda_1(H_i).

    With sampled factors E[H_i^mc] = H_i, and labels are sampled independently across
    samples, so for i != j E[tr(H_i^mc H_j^mc)] = tr(E H_i^mc E H_j^mc) = tr(H_i H_j): the
    squared off-diagonal entries of S are unbiased. The diagonal S_ii^2 = ||H_i^mc||_F^2 is
    inflated by the sampling variance (Jensen), and sigma, S_ij = sqrt(tr(H_i H_j)) and
    max_i lambda_1(H_i) are nonlinear in the factors: biased (docs/theory.md §3).
    """
    torch.manual_seed(0)
    model = mlp(c=4).double()
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    ce = nn.CrossEntropyLoss()
    exact = measure_curvature(model, x, y, ce, sharpness="ggn")
    K = exact.gram.reshape(24, 24)
    # the GGN is A^T A summed over rows; compare the C=R-independent quantity sum_r K_ir,jr
    ref = exact.gram.diagonal(dim1=1, dim2=3).sum(-1).diagonal()  # tr H_i
    reps = 300
    runs = [
        measure_curvature(model, x, y, ce, factors="mc", mc_samples=2, sharpness=None, seed=s)
        for s in range(reps)
    ]
    samples = torch.stack([r.gram.diagonal(dim1=1, dim2=3).sum(-1).diagonal() for r in runs])
    z = (samples.mean(0) - ref) / (samples.std(0) / reps**0.5 + 1e-300)
    assert z.abs().max() < 4.5, z
    # squared off-diagonal S entries: unbiased; the squared diagonal: inflated
    off = ~torch.eye(6, dtype=torch.bool)
    s2 = torch.stack([r.stats.S.square() for r in runs])
    s2_ref = exact.stats.S.square()
    z_off = (s2.mean(0) - s2_ref)[off] / (s2.std(0)[off] / reps**0.5)
    assert z_off.abs().max() < 4.5, z_off
    z_diag = (s2.mean(0) - s2_ref).diagonal() / (s2.std(0).diagonal() / reps**0.5)
    assert z_diag.min() > 4.5, z_diag
    # a deliberately wrong scale (factor 1.2) is detected by the same test: it can fail
    z_bad = (1.2 * samples.mean(0) - ref) / (samples.std(0) / reps**0.5)
    assert z_bad.abs().max() > 4.5
    mc = measure_curvature(model, x, y, ce, factors="mc", mc_samples=1, sharpness="ggn", seed=0)
    assert mc.factors == "mc" and mc.gram.shape == (6, 1, 6, 1)
    assert K.shape == (24, 24)
    # per-sample quantities are not unbiased: report the bias (docs/theory.md §3)
    sig = [
        measure_curvature(model, x, y, ce, factors="mc", sharpness=None, seed=s).stats
        for s in range(50)
    ]
    mean_max = sum(s.max_sample_sharpness for s in sig) / len(sig)
    assert mean_max > exact.stats.max_sample_sharpness  # sampled labels inflate the maximum


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1)])
def test_mean_gradient_sq_norm_is_the_mean_loss_gradient(gen, loss):
    """|g_m|^2 = 1^T P 1 / m^2 against one autograd backward pass of the mean probe loss."""
    torch.manual_seed(2)
    model = mlp().double()
    x, y = _data(gen)
    rep = measure_curvature(model, x, y, loss, sharpness=None)
    grads = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    ref = float(sum(g.square().sum() for g in grads))
    assert rep.mean_gradient_sq_norm == pytest.approx(ref, rel=1e-10)
