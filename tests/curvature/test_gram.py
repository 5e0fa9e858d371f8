"""Block Gram from every assembly path against the dense per-sample GGN (jacrev x Lambda)."""

from __future__ import annotations

import pytest
import torch
from curvature.curv_cases import MODELS, dense_ggn, make_inputs, make_targets
from torch import nn

from torch_coherence.coherence import coherence_from_hessians
from torch_coherence.curvature import measure
from torch_coherence.curvature.gram import gram_factors
from torch_coherence.curvature.losses import output_curvature

M = 6
LOSSES = {
    "ce": nn.CrossEntropyLoss(),
    "ce_smooth": nn.CrossEntropyLoss(label_smoothing=0.1),
    "mse": nn.MSELoss(),
    "bce_sum": nn.BCEWithLogitsLoss(reduction="sum"),
}


def _problem(kind, loss_name, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MODELS[kind]().double()
    loss = LOSSES[loss_name]
    x = make_inputs(kind, M, gen)
    y = make_targets(loss, M, 3, gen)
    return model, x, y, loss


CASES = [(kind, loss) for kind in MODELS for loss in ("ce", "mse")] + [
    ("mlp", "ce_smooth"),
    ("mlp", "bce_sum"),
    ("mixed", "bce_sum"),
    ("cnn", "bce_sum"),
]


@pytest.mark.parametrize("force", [None, "ghost", "materialise", "fallback"])
@pytest.mark.parametrize(("kind", "loss_name"), CASES)
def test_every_path_equals_dense_gram(kind, loss_name, force):
    model, x, y, loss = _problem(kind, loss_name)
    A = dense_ggn(model, x, y, loss)
    Kref = torch.einsum("irp,jsp->irjs", A, A)
    B = output_curvature(loss, model(x), y).sqrt
    facs = gram_factors(model, x, B, dict(model.named_parameters()), force=force, chunk_size=4)
    K = facs.full()
    assert K.dtype == torch.float64
    torch.testing.assert_close(K, Kref, rtol=0, atol=1e-10 * max(1.0, float(Kref.abs().max())))
    # K-products through the factor structure and chunk-wise blocks agree with K
    v = torch.randn(K.shape[0] * K.shape[1], dtype=torch.float64)
    Kf = Kref.reshape(v.shape[0], -1)
    torch.testing.assert_close(facs.matvec(v), Kf @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        facs.block(slice(1, 3), slice(2, 6)), Kref[1:3, :, 2:6], atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("kind", ["mlp", "mixed", "cnn"])
def test_coherence_matches_dense_hessians(kind):
    model, x, y, loss = _problem(kind, "ce")
    A = dense_ggn(model, x, y, loss)
    H = A.transpose(1, 2) @ A
    ref = coherence_from_hessians(H)
    rep = measure.measure_curvature(model, x, y, loss, sharpness="ggn")
    assert rep.stats.sigma == pytest.approx(ref.sigma, rel=1e-8)
    assert rep.stats.max_sample_sharpness == pytest.approx(ref.max_sample_sharpness, rel=1e-8)
    assert rep.ggn_sharpness == pytest.approx(ref.sharpness, rel=1e-8)
    torch.testing.assert_close(rep.stats.S, ref.S, rtol=1e-8, atol=1e-10)
    assert rep.num_params == sum(p.numel() for p in model.parameters())


def test_large_probe_path_equals_dense(monkeypatch):
    model, x, y, loss = _problem("mixed", "ce")
    dense = measure.measure_curvature(model, x, y, loss, sharpness="ggn")
    monkeypatch.setattr(measure, "DENSE_LIMIT", 4)
    large = measure.measure_curvature(model, x, y, loss, sharpness="ggn", eig_method="lanczos")
    assert large.gram is None and dense.gram is not None
    assert large.stats.sigma == pytest.approx(dense.stats.sigma, rel=1e-8)
    assert large.ggn_sharpness == pytest.approx(dense.ggn_sharpness, rel=1e-8)
    assert large.gradient_noise_scale == pytest.approx(dense.gradient_noise_scale, rel=1e-8)
    torch.testing.assert_close(large.stats.S, dense.stats.S, rtol=1e-9, atol=1e-12)
    # odd block sizes (blocks straddling the diagonal) give the same S; return_gram forms K
    for chunk in (1, 4, 5):
        other = measure.measure_curvature(
            model, x, y, loss, sharpness="ggn", chunk_size=chunk, return_gram=chunk == 5
        )
        torch.testing.assert_close(other.stats.S, dense.stats.S, rtol=1e-9, atol=1e-12)
        assert other.stats.max_sample_sharpness == pytest.approx(
            dense.stats.max_sample_sharpness, rel=1e-9
        )
        assert (other.gram is not None) == (chunk == 5)
    torch.testing.assert_close(other.gram, dense.gram)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"return_gram": 1}, "return_gram"),
    ],
)
def test_block_options_rejected(kwargs, name):
    model, x, y, loss = _problem("mlp", "ce")
    with pytest.raises(ValueError, match=name):
        measure.measure_curvature(model, x, y, loss, **kwargs)


def test_param_subset_and_frozen_params():
    model, x, y, loss = _problem("mixed", "mse")
    names = ["2.weight", "1.w", "1.norm.bias"]
    A = dense_ggn(model, x, y, loss, params=names)
    ref = coherence_from_hessians(A.transpose(1, 2) @ A)
    rep = measure.measure_curvature(model, x, y, loss, params=names, sharpness="ggn")
    assert rep.num_params == A.shape[2]
    assert rep.stats.sigma == pytest.approx(ref.sigma, rel=1e-8)
    # freezing the others is the same as selecting these
    for k, p in model.named_parameters():
        p.requires_grad_(k in names)
    rep2 = measure.measure_curvature(model, x, y, loss, sharpness="ggn")
    assert rep2.num_params == A.shape[2]
    assert rep2.stats.sigma == pytest.approx(ref.sigma, rel=1e-10)
    assert [p.requires_grad for p in model.parameters()].count(True) == 3
    # only a bias of a Linear layer (ghost rule with a constant input)
    for p in model.parameters():
        p.requires_grad_(True)
    A = dense_ggn(model, x, y, loss, params=["0.bias"])
    rep3 = measure.measure_curvature(model, x, y, loss, params=["0.bias"], sharpness="ggn")
    assert rep3.ggn_sharpness == pytest.approx(
        coherence_from_hessians(A.transpose(1, 2) @ A).sharpness
    )


def test_gradient_noise_scale_from_per_sample_gradients():
    model, x, y, loss = _problem("mlp", "ce")
    params = dict(model.named_parameters())

    def one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return loss(out, yi[None])

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(
        {k: v.detach() for k, v in params.items()}, x, y
    )
    G = torch.cat([v.reshape(M, -1) for v in g.values()], 1)
    mean = G.mean(0)
    tr_sigma = ((G - mean) ** 2).sum() / (M - 1)
    g2 = mean.square().sum() - tr_sigma / M  # unbiased |G|^2
    rep = measure.measure_curvature(model, x, y, loss, sharpness=None)
    assert rep.gradient_noise_scale == pytest.approx(float(tr_sigma / g2), rel=1e-9)


def test_sketch_is_unbiased_and_error_shrinks_like_inverse_sqrt_k():
    from torch_coherence.curvature.gram import sketch

    model, x, y, loss = _problem("embed", "ce")
    B = output_curvature(loss, model(x), y).sqrt
    facs = gram_factors(model, x, B, dict(model.named_parameters()))
    K = facs.full()
    gen = torch.Generator().manual_seed(0)
    errs = {}
    for k in (8, 128):
        samples = torch.stack([sketch(facs, k, gen).full() for _ in range(100)])
        errs[k] = float(((samples - K).flatten(1).norm(dim=1) / K.norm()).mean())
        if k == 8:  # unbiased: z-scores of the mean over 100 sketches
            z = (samples.mean(0) - K) / (samples.std(0) / 10 + 1e-12)
            assert z.abs().max() < 5.0
    ratio = errs[8] / errs[128]  # 1/sqrt(k): sqrt(16) = 4
    assert 3.0 < ratio < 5.3, errs
    rep = measure.measure_curvature(model, x, y, loss, sketch_dim=256, sharpness="ggn", seed=0)
    exact = measure.measure_curvature(model, x, y, loss, sharpness="ggn")
    assert rep.ggn_sharpness == pytest.approx(exact.ggn_sharpness, rel=0.3)
