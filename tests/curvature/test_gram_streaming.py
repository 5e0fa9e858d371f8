"""The streamed Gram (each layer summed into K as soon as its factors exist) against the
dense per-sample GGN, for every assembly path, with the fallback split into parameter groups."""

from __future__ import annotations

import pytest
import torch
from curvature.curv_cases import MODELS, dense_ggn, make_inputs, make_targets
from torch import nn

from torch_coherence.curvature import gram
from torch_coherence.curvature.gram import gram_factors
from torch_coherence.curvature.losses import output_curvature

M = 5


def _reference(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 model of ``kind``, its inputs, B and the dense reference K (jacrev)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MODELS[kind]().double()
    loss = nn.CrossEntropyLoss()
    x = make_inputs(kind, M, gen)
    y = make_targets(loss, M, 3, gen)
    A = dense_ggn(model, x, y, loss)
    B = output_curvature(loss, model(x), y).sqrt
    return model, x, B, torch.einsum("irp,jsp->irjs", A, A)


@pytest.mark.parametrize("force", [None, "ghost", "materialise", "fallback"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_streamed_gram_equals_dense_gram(kind, force, monkeypatch):
    monkeypatch.setattr(gram, "FALLBACK_GROUP_BYTES", 1)  # one torch.func pass per parameter
    monkeypatch.setattr(gram, "ROW_BLOCK_BYTES", 2000)  # materialised rows in sample blocks
    model, x, B, Kref = _reference(kind)
    params = dict(model.named_parameters())
    facs = gram_factors(model, x, B, params, force=force, chunk_size=2, accumulate=True)
    assert facs.ghosts == [] and facs.rows == [] and facs.dense is not None
    tol = 1e-10 * max(1.0, float(Kref.abs().max()))
    torch.testing.assert_close(facs.full(), Kref, rtol=0, atol=tol)
    v = torch.randn(M * 3, dtype=torch.float64)
    torch.testing.assert_close(facs.matvec(v), Kref.reshape(M * 3, -1) @ v, rtol=0, atol=tol)
    head, tail = facs.split(2)
    torch.testing.assert_close(head.full(), Kref[:, :2, :, :2], rtol=0, atol=tol)
    torch.testing.assert_close(
        tail.diag_blocks(2), torch.stack([Kref[i, 2:, i, 2:] for i in range(M)])
    )


def test_fallback_groups_respect_the_byte_budget(monkeypatch):
    monkeypatch.setattr(gram, "FALLBACK_GROUP_BYTES", 100)
    ps = {"a": torch.zeros(3), "b": torch.zeros(30), "c": torch.zeros(4), "d": torch.zeros(2)}
    groups = gram._groups(ps, bytes_per_entry=8)
    assert [sorted(g) for g in groups] == [["a", "c", "d"], ["b"]]  # b alone: over budget
    assert sum(len(g) for g in groups) == 4


def test_sketch_sink_projects_layer_by_layer_unbiased_and_keeps_the_gradient_rows_exact():
    from torch_coherence.curvature.measure import measure_curvature

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MODELS["mixed"]().double()  # covered layers and a fallback module
    loss = nn.CrossEntropyLoss()
    x = make_inputs("mixed", M, gen)
    y = make_targets(loss, M, 3, gen)
    A = dense_ggn(model, x, y, loss)
    Kref = torch.einsum("irp,jsp->irjs", A, A)
    B = output_curvature(loss, model(x), y).sqrt
    g = torch.randn(M, 3, 1, dtype=torch.float64, generator=gen)
    ext = torch.cat([B, g], 2)
    params = dict(model.named_parameters())
    exact_tail = gram_factors(model, x, ext, params).split(3)[1].full()
    seen = []
    draws = []
    for seed in range(200):
        sink = gram.SketchSink(M, 3, 16, torch.Generator().manual_seed(seed))

        def spy(part, sink=sink):
            seen.append(len(part.ghosts) + len(part.rows))
            sink(part)

        left = gram_factors(model, x, ext, params, sink=spy)
        assert left.ghosts == [] and left.rows == [] and left.dense is None
        head, tail = sink.result()
        torch.testing.assert_close(tail.full(), exact_tail, rtol=1e-12, atol=1e-12)
        draws.append(head.full())
    assert set(seen) == {1}  # every part is one layer (or one fallback group)
    draws = torch.stack(draws)
    z = (draws.mean(0) - Kref) / (draws.std(0) / len(draws) ** 0.5 + 1e-12)
    assert z.abs().max() < 5
    rep = measure_curvature(model, x, y, loss, sketch_dim=16, sharpness=None, seed=0)
    ref = measure_curvature(model, x, y, loss, sharpness=None, seed=0)
    assert rep.gradient_noise_scale == pytest.approx(ref.gradient_noise_scale, rel=1e-10)


def test_streamed_fallback_rows_of_a_float32_model_give_the_same_gram(monkeypatch):
    """Fallback rows kept in float32, their Gram taken in float32 by sample blocks and summed
    in float64: the unstreamed path's numbers (rows converted to float64 first) to float32
    rounding."""
    monkeypatch.setattr(gram, "ROW_BLOCK_BYTES", 3000)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MODELS["mixed"]().float()
    loss = nn.CrossEntropyLoss()
    x = make_inputs("mixed", M, gen).float()
    y = make_targets(loss, M, 3, gen)
    B = output_curvature(loss, model(x), y).sqrt
    params = dict(model.named_parameters())
    ref = gram_factors(model, x, B, params, force="fallback").full()
    got = gram_factors(model, x, B, params, force="fallback", accumulate=True).full()
    assert got.dtype == torch.float64
    err = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < err < 1e-6  # float32 products (not the float64 ones), within float32 rounding


class _WideConv(nn.Module):
    """Convolutions whose rows (o k) are smaller than their output gradients (T o): over the
    memory budget, both are built from blocks of rows' output gradients as the passes go,
    never stored (m, R, T, o); the norm layer's rows always are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2)
        self.grouped = nn.Conv2d(4, 4, 2, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.grouped(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(h).mean((2, 3)))


@pytest.mark.parametrize("block_bytes", [1, 2**30], ids=["row_by_row", "all_rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("force", [None, "materialise", "ghost"])
def test_rows_built_pass_by_pass_equal_the_dense_gram(force, dtype, block_bytes, monkeypatch):
    monkeypatch.setattr(gram, "GRAD_STORE_BYTES", 0)  # stream every layer that can be
    monkeypatch.setattr(gram, "STREAM_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _WideConv().eval().to(dtype)
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    loss = nn.CrossEntropyLoss()
    x = torch.randn(M, 2, 9, 9, generator=gen).to(dtype)
    y = make_targets(loss, M, 3, gen)
    A = dense_ggn(model.double(), x.double(), y, loss)
    model.to(dtype)
    Kref = torch.einsum("irp,jsp->irjs", A, A)
    B = output_curvature(loss, model(x), y).sqrt
    streamed = []
    orig = gram._row_streams

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        streamed.extend(type(s.mod).__name__ for s in out.values())
        return out

    monkeypatch.setattr(gram, "_row_streams", spy)
    for accumulate in (False, True):
        facs = gram_factors(
            model, x, B, dict(model.named_parameters()), force=force, accumulate=accumulate
        )
        err = float((facs.full() - Kref).abs().max() / Kref.abs().max())
        assert err < (1e-12 if dtype == torch.float64 else 2e-6), err
        assert facs.notes.fallback == {} and facs.notes.check_error < 1e-3
    expected = ["BatchNorm2d"] + ([] if force == "ghost" else ["Conv2d", "Conv2d"])
    assert sorted(set(streamed)) == sorted(set(expected)) and len(streamed) == 2 * len(expected)


@pytest.mark.parametrize("elems", [1, 300], ids=["one_sample_pairs", "small_blocks"])
@pytest.mark.parametrize("kind", ["cnn", "seq", "embed"])
def test_ghost_blocks_in_sample_blocks_equal_the_dense_gram(kind, elems, monkeypatch):
    """Ghost products split into sample blocks (symmetric blocks mirrored) give the same K."""
    monkeypatch.setattr(gram, "GHOST_BLOCK_ELEMS", elems)
    model, x, B, Kref = _reference(kind)
    facs = gram_factors(model, x, B, dict(model.named_parameters()), force="ghost")
    assert facs.ghosts and any(g.d.shape[2] > 1 for g in facs.ghosts)
    tol = 1e-10 * float(Kref.abs().max())
    torch.testing.assert_close(facs.full(), Kref, rtol=0, atol=tol)
    torch.testing.assert_close(
        facs.block(slice(1, 4), slice(0, 5)), Kref[1:4, :, 0:5], rtol=0, atol=tol
    )
