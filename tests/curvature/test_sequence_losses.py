"""Cross-entropy over sequences: per-sequence losses, exact / top-k / sampled factors, callables.

References: the dense output Hessian of each sequence's loss by ``torch.func.hessian`` over
all T V logits, and per-sample GGNs from ``jacrev`` (``curv_cases.dense_ggn``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvature.curv_cases import dense_lambda
from references import reference_coherence
from torch import nn
from torch.func import functional_call, jacrev, vmap

from torch_coherence.curvature import measure_curvature
from torch_coherence.curvature.losses import custom as custom_mod
from torch_coherence.curvature.losses import (
    output_curvature,
    output_gradients,
    per_sample_losses,
    sampled_curvature,
    truncated_curvature,
)

M, T, V = 3, 4, 5
F64 = torch.float64


def _logits(gen, scale=1.0, m=M, t=T, v=V):
    return torch.randn(m, t, v, generator=gen, dtype=F64) * scale


def _dense(oc):
    sq = oc.sqrt if isinstance(oc.sqrt, torch.Tensor) else oc.sqrt.dense()
    return sq @ sq.transpose(1, 2)


def _ref_loss(loss, o, t):
    """One sequence's loss from its (T, V) logits, written out (no engine code)."""
    el = (
        nn.functional.cross_entropy(
            o, t, reduction="none", label_smoothing=loss.label_smoothing, ignore_index=-1
        )
        if loss.ignore_index == -1
        else nn.functional.cross_entropy(
            o, t, reduction="none", label_smoothing=loss.label_smoothing
        )
    )
    w = (t != loss.ignore_index).to(o.dtype)
    if loss.weight is not None:
        w = w * loss.weight[t.clamp_min(0)]
    return (el * w).sum() if loss.reduction == "sum" else (el * w).sum() / w.sum()


def _seq_lambda(loss, out, y, last=True):
    """Hessian of each sequence's own loss over all its logits, (m, T V, T V)."""
    shape = out.shape[1:]

    def one(o, t):
        o = o.reshape(shape)
        return _ref_loss(loss, o if last else o.T, t)

    return dense_lambda(one, out.reshape(out.shape[0], -1), y)


LOSSES = [
    nn.CrossEntropyLoss(),
    nn.CrossEntropyLoss(label_smoothing=0.2),
    nn.CrossEntropyLoss(ignore_index=-1),
    nn.CrossEntropyLoss(reduction="sum"),
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64)),
]


def _targets(loss, gen, equal_counts=True):
    y = torch.randint(0, V, (M, T), generator=gen)
    if loss.ignore_index == -1:
        y[:, 0] = -1  # one ignored token per sequence: equal counts
        if not equal_counts:
            y[0, 1] = -1
    return y


@pytest.mark.parametrize("loss", LOSSES, ids=lambda fn: repr(fn))
@pytest.mark.parametrize("layout", ["mtv", "mvt"])
def test_mean_of_sequence_losses_is_training_loss_and_exact_factor_is_hessian(loss, layout, gen):
    z = _logits(gen)
    y = _targets(loss, gen)
    out = z if layout == "mtv" else z.transpose(1, 2).contiguous()
    ls = per_sample_losses(loss, out, y)
    train = loss(z.transpose(1, 2), y)  # torch's (m, V, T) layout
    if loss.reduction == "sum":
        torch.testing.assert_close(ls.sum(), train, rtol=1e-12, atol=1e-12)
    elif loss.weight is None:
        torch.testing.assert_close(ls.mean(), train, rtol=1e-12, atol=1e-12)
    else:  # per-sequence normalisation: the mean of the sequences' weighted means
        w = loss.weight[y]
        el = nn.functional.cross_entropy(z.transpose(1, 2), y, reduction="none", weight=None)
        torch.testing.assert_close(ls, (w * el).sum(1) / w.sum(1), rtol=1e-12, atol=1e-12)
    lam = _seq_lambda(loss, out, y, last=layout == "mtv")
    oc = output_curvature(loss, out, y)
    assert oc.sqrt.shape == (M, T * V, V * int((y != loss.ignore_index).sum(1).max()))
    torch.testing.assert_close(_dense(oc), lam, rtol=1e-10, atol=1e-12)
    g = output_gradients(loss, out, y)
    gref = torch.func.vmap(
        torch.func.grad(lambda o, t: _ref_loss(loss, o if layout == "mtv" else o.T, t))
    )(out, y)
    torch.testing.assert_close(g, gref.reshape(M, -1), rtol=1e-10, atol=1e-12)


def test_unequal_counts_weigh_sequences_not_tokens(gen):
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    z = _logits(gen)
    y = _targets(loss, gen, equal_counts=False)
    ls = per_sample_losses(loss, z, y)
    el = nn.functional.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-1)
    counts = (y != -1).sum(1)
    torch.testing.assert_close(ls, el.sum(1) / counts)
    assert not torch.isclose(ls.mean(), loss(z.transpose(1, 2), y))


def test_all_ignored_sequence_and_bad_labels_are_refused(gen):
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    z = _logits(gen)
    y = torch.randint(0, V, (M, T), generator=gen)
    y[1] = -1
    with pytest.raises(ValueError, match=r"sequences \[1\]"):
        per_sample_losses(loss, z, y)
    y[1] = V
    with pytest.raises(ValueError, match=r"targets: class indices must lie in \[0, 5\)"):
        output_curvature(loss, z, y)
    with pytest.raises(ValueError, match="integer class indices"):
        per_sample_losses(loss, z, y.double())
    with pytest.raises(ValueError, match="matches neither"):
        per_sample_losses(loss, z, y[:, :2])


def _token_lambda(p):
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


@pytest.mark.parametrize("tol", [0.0, 0.02, 0.2, 0.6])
def test_topk_error_is_psd_and_within_the_largest_discarded_probability(tol, gen):
    m, t, v = 4, 6, 40
    z = _logits(gen, scale=3.0, m=m, t=t, v=v)  # peaked: a few classes carry the mass
    y = torch.randint(0, v, (m, t), generator=gen)
    loss = nn.CrossEntropyLoss()
    oc = truncated_curvature(loss, z, y, tol)
    B = oc.sqrt.dense().reshape(m, t, v, -1)
    p = z.softmax(-1)
    worst = 0.0
    rows = 0
    for i in range(m):
        for s in range(t):
            cols = B[i, s] * t**0.5  # undo omega = 1 / T
            cols = cols[:, cols.abs().sum(0) > 0]
            rows = max(rows, cols.shape[1])
            E = _token_lambda(p[i, s]) - cols @ cols.T
            ev = torch.linalg.eigvalsh(E)
            assert ev[0] > -1e-12  # truncated <= exact (Loewner)
            k = cols.shape[1] - 1 if cols.shape[1] < v else v
            discarded = p[i, s].sort(descending=True).values[k:]
            largest = float(discarded.max()) if discarded.numel() else 0.0
            assert ev[-1] <= largest + 1e-12  # ||E|| <= p_(k+1)
            norm = torch.linalg.eigvalsh(_token_lambda(p[i, s]))[-1]
            worst = max(worst, float(ev[-1] / norm))
    assert worst <= oc.truncation + 1e-12
    assert oc.truncation <= tol + 1e-12
    if tol == 0.0:
        torch.testing.assert_close(_dense(oc), _dense(output_curvature(loss, z, y)))
    if tol >= 0.2:
        assert rows < v // 2  # a real truncation


def test_topk_on_classification_logits_with_class_weights(gen):
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64)
    loss = nn.CrossEntropyLoss(weight=w)
    z = torch.randn(6, V, generator=gen, dtype=F64)
    y = torch.randint(0, V, (6,), generator=gen)
    exact = _dense(output_curvature(loss, z, y))
    torch.testing.assert_close(_dense(truncated_curvature(loss, z, y, 0.0)), exact)
    oc = truncated_curvature(loss, z, y, 0.3)
    assert torch.linalg.eigvalsh(exact - _dense(oc)).min() > -1e-12


def test_topk_cap_reports_the_bound_it_reached(gen):
    from torch_coherence.curvature.losses import sequence

    z = torch.zeros(2, 3, 30, dtype=F64)  # uniform: every class equally likely
    y = torch.zeros(2, 3, dtype=torch.long)
    fac, bound = sequence.truncated_factor(nn.CrossEntropyLoss(), z, y, 1e-3, max_k=4)
    assert fac.shape[2] == 3 * 5
    mu = (1 / 30) * (1 - 1 / 30)
    assert bound == pytest.approx((1 / 30) / mu)


def test_mc_sequence_columns_are_unbiased(gen):
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    z = _logits(gen)
    y = _targets(loss, gen)
    exact = _dense(output_curvature(loss, z, y))
    S = 4000
    oc = sampled_curvature(loss, z, y, S, gen)
    assert oc.sqrt.shape == (M, T * V, S)
    est = _dense(oc)
    # each entry is a mean of S iid terms; compare against 5 standard errors
    cols = oc.sqrt.dense() * S**0.5
    terms = cols.unsqueeze(2) * cols.unsqueeze(1)  # (m, C, C, S)
    se = terms.std(-1) / S**0.5
    assert ((est - exact).abs() <= 5 * se + 1e-12).float().mean() > 0.99
    assert (est - exact).abs().max() < 0.05 * exact.abs().max()
    # the ignored first token contributes nothing
    assert est.reshape(M, T, V, T, V)[:, 0].abs().max() == 0


def test_mc_sequence_layout_mvt_matches_mtv(gen):
    loss = nn.CrossEntropyLoss()
    z = _logits(gen)
    y = torch.randint(0, V, (M, T), generator=gen)
    a = sampled_curvature(loss, z, y, 3, torch.Generator().manual_seed(1)).sqrt.dense()
    b = sampled_curvature(
        loss, z.transpose(1, 2).contiguous(), y, 3, torch.Generator().manual_seed(1)
    ).sqrt.dense()
    torch.testing.assert_close(b.reshape(M, V, T, 3).transpose(1, 2).reshape(M, -1, 3), a)


def test_callable_sequence_loss_uses_token_blocks(gen, monkeypatch):
    monkeypatch.setattr(custom_mod, "FULL_HESSIAN_MAX", 4)
    z = _logits(gen)
    y = torch.randint(0, V, (M, T), generator=gen)

    def seq_ce(o, t):  # one sequence (T, V)
        return nn.functional.cross_entropy(o, t)

    oc = output_curvature(seq_ce, z, y)
    lam = dense_lambda(lambda o, t: seq_ce(o.reshape(T, V), t), z.reshape(M, -1), y)
    torch.testing.assert_close(_dense(oc), lam, rtol=1e-10, atol=1e-12)

    def coupled(o, t):
        return nn.functional.cross_entropy(o, t) + o[0, 0] * o[1, 1]

    with pytest.raises(ValueError, match="couples positions"):
        output_curvature(coupled, z, y)


class TinyLM(nn.Module):
    """Embedding, one causal self-attention layer, tied output projection."""

    def __init__(self, vocab: int = 11, d: int = 6, t: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.3)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos[:t]
        q, k, v = self.qkv(h).chunk(3, -1)
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp(h)
        return self.head(h)


def _reference_stats(model, ids, y, loss):
    named = dict(model.named_parameters())
    pv = {k: p.detach() for k, p in named.items()}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(pv, ids)
    J = torch.cat([jac[k].reshape(jac[k].shape[0], jac[k].shape[1], -1) for k in named], 2)
    with torch.no_grad():
        out = model(ids)
    lam = _seq_lambda(loss, out, y, last=out.shape[-1] == 11)
    H = J.transpose(1, 2) @ lam @ J
    return reference_coherence(H.numpy())


@pytest.mark.parametrize("layout", ["mtv", "mvt"])
def test_language_model_sigma_exact_topk_and_mc_against_dense_reference(layout, gen):
    torch.manual_seed(0)
    model = TinyLM().double()
    with torch.no_grad():
        model.head.weight.mul_(4.0)  # peaked predictions
    m = 4
    ids = torch.randint(0, 11, (m, 5), generator=gen)
    y = torch.randint(0, 11, (m, 5), generator=gen)
    y[:, 0] = -100  # ignore the first token of every sequence
    loss = nn.CrossEntropyLoss()
    wrapped = model if layout == "mtv" else _Wrap(model)
    ref = _reference_stats(wrapped, ids, y, loss)
    kw = dict(sharpness="ggn")
    exact = measure_curvature(wrapped, ids, y, loss, **kw)
    assert exact.stats.sigma == pytest.approx(ref.sigma, rel=1e-8)
    assert exact.ggn_sharpness == pytest.approx(ref.sharpness, rel=1e-8)
    assert exact.truncation_bound == 0.0
    top = measure_curvature(wrapped, ids, y, loss, factors="topk", factor_tol=0.05, **kw)
    assert 0 < top.truncation_bound <= 0.05
    assert top.stats.sigma == pytest.approx(ref.sigma, rel=0.05)
    assert top.ggn_sharpness <= ref.sharpness * (1 + 1e-9)
    assert top.stats.max_sample_sharpness <= ref.max_sample_sharpness * (1 + 1e-9)
    mc = measure_curvature(wrapped, ids, y, loss, factors="mc", mc_samples=2, **kw)
    assert np.isfinite(mc.stats.sigma) and mc.factors == "mc"


class _Wrap(nn.Module):
    """The TinyLM with PyTorch's (m, V, T) output layout."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).transpose(1, 2)


def test_nll_on_sequence_log_probs_matches_cross_entropy(gen):
    z = _logits(gen)
    y = torch.randint(0, V, (M, T), generator=gen)
    logp = z.log_softmax(-1)
    nll, ce = nn.NLLLoss(), nn.CrossEntropyLoss()
    torch.testing.assert_close(
        per_sample_losses(nll, logp, y).mean(), nll(logp.transpose(1, 2), y), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        _dense(output_curvature(nll, logp, y)), _dense(output_curvature(ce, z, y))
    )
    a = truncated_curvature(nll, logp, y, 0.1)
    b = truncated_curvature(ce, z, y, 0.1)
    torch.testing.assert_close(_dense(a), _dense(b))
    assert a.truncation == pytest.approx(b.truncation, rel=1e-12)


@pytest.mark.parametrize("layout", ["mtv", "mvt"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"label_smoothing": 0.2}, {"ignore_index": 1}, {"reduction": "sum"}, {"weight": "w"}],
    ids=["plain", "smoothing", "ignore", "sum", "weights"],
)
@pytest.mark.parametrize("kind", ["ce", "nll"])
def test_closed_form_sequence_gradients_equal_autograd(layout, kw, kind):
    """The closed-form per-sequence gradients against autograd of the per-sequence losses."""
    from torch_coherence.curvature.losses import sequence

    if kind == "nll" and "label_smoothing" in kw:
        pytest.skip("NLLLoss has no label smoothing")
    gen = torch.Generator().manual_seed(3)
    m, T, V = 3, 4, 5
    z = torch.randn(m, T, V, generator=gen, dtype=torch.float64)
    if kind == "nll":
        z = z.log_softmax(-1)
    y = torch.randint(0, V, (m, T), generator=gen)
    y[:, 0] = 2  # every sequence keeps a token when ignore_index = 1
    if kw.get("weight") == "w":
        kw = {"weight": torch.rand(V, generator=gen, dtype=torch.float64) + 0.5}
    loss = (nn.CrossEntropyLoss if kind == "ce" else nn.NLLLoss)(**kw)
    out = z if layout == "mtv" else z.transpose(1, 2).contiguous()
    leaf = out.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(sequence.per_sample_losses(loss, leaf, y).sum(), leaf)
    got = sequence.per_sample_gradients(loss, out, y)
    torch.testing.assert_close(got, ref.reshape(m, -1), rtol=1e-12, atol=1e-14)


def test_mc_sequence_columns_of_a_float32_model_are_its_float64_columns_rounded(gen):
    """For a float32 model the sampled columns are built in float32 (the engine would round
    them to it anyway): the same draws, equal to the float64 columns to float32 rounding."""
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    z = _logits(gen)
    y = _targets(loss, gen)
    c64 = sampled_curvature(loss, z, y, 3, torch.Generator().manual_seed(2)).sqrt
    c32 = sampled_curvature(loss, z.float(), y, 3, torch.Generator().manual_seed(2)).sqrt
    assert c64.column(0).dtype == torch.float64 and c32.column(0).dtype == torch.float32
    for r in range(3):
        torch.testing.assert_close(c32.column(r).double(), c64.column(r), rtol=2e-6, atol=1e-7)
    ext = c32.with_columns(torch.ones(M, T * V, 1, dtype=torch.float64))  # mixed dtypes
    assert ext.block(slice(0, 2)).dtype == torch.float64 and ext.block(slice(0, 2)).shape[2] == 4
