"""The Hugging Face ``Conv1D`` rule (``layers.conv1d``): matching, a tiny GPT-2, and its check.

References: the dense float64 per-sample GGN from ``jacrev`` (``cases.dense_gram``); the case
table row ``conv1d_hf`` covers a plain and a subclassed ``Conv1D`` in both dtypes and losses.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from curvature.cases import Head, M, dense_gram
from integrations.hf_helpers import VOCAB, tiny_gpt2
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torch_coherence.curvature import measure_curvature
from torch_coherence.curvature.layers import find_rule
from torch_coherence.curvature.layers.conv1d import Conv1DRule
from torch_coherence.curvature.losses import output_curvature
from torch_coherence.curvature.losses.factor import sample_block

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _error(K: torch.Tensor, Kref: torch.Tensor) -> float:
    return float((K - Kref).abs().max() / Kref.abs().max())


def test_rule_matches_the_stock_class_and_its_structure_only():
    assert isinstance(find_rule(Conv1D(6, 4)), Conv1DRule)

    class Inherits(Conv1D):
        pass

    class Overrides(Conv1D):
        def forward(self, x):
            return super().forward(x) * 2

    class Conv1DLookalike(nn.Module):  # same name and structure, another module
        def __init__(self):
            super().__init__()
            self.nf, self.weight, self.bias = 3, nn.Parameter(torch.ones(2, 3)), None

    Conv1DLookalike.__qualname__ = "Conv1D"
    assert isinstance(find_rule(Inherits(3, 2)), Conv1DRule)
    assert find_rule(Overrides(3, 2)) is None and find_rule(Conv1DLookalike()) is None
    patched = Conv1D(3, 2)
    patched.forward = lambda x: x @ patched.weight  # an instance's own forward
    wrong_nf, flat, no_bias = Conv1D(3, 2), Conv1D(3, 2), Conv1D(3, 2)
    wrong_nf.nf = 4
    flat.weight = nn.Parameter(torch.ones(6))
    no_bias.bias = None
    for mod in (patched, wrong_nf, flat, no_bias):
        assert find_rule(mod) is None


class _Logits(nn.Module):
    """The reference's view of the LM: ids -> logits (m, T, V)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def _lm_reference(model: nn.Module, ids: torch.Tensor, y: torch.Tensor, loss: nn.Module):
    """K = B^T J J^T B with J from jacrev per sequence (float64) and the loss's exact factor B,
    itself checked against the Hessian of each sequence's mean token CE written out here."""
    named = {k: p.detach() for k, p in model.named_parameters()}
    J = []
    for i in range(ids.shape[0]):
        jac = jacrev(lambda p, i=i: functional_call(model, p, (ids[i : i + 1],)).reshape(-1))(named)
        J.append(torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], 1))
    J = torch.stack(J)  # (m, T V, d)
    with torch.no_grad():
        out = model(ids)
    B = sample_block(output_curvature(loss, out, y).sqrt, slice(None))  # (m, T V, R)
    V = out.shape[-1]
    for i in range(ids.shape[0]):
        lam = hessian(lambda z, i=i: F.cross_entropy(z.view(-1, V), y[i]))(out[i].reshape(-1))
        torch.testing.assert_close(B[i] @ B[i].T, lam, rtol=0, atol=1e-12)
    A = B.transpose(1, 2) @ J
    return torch.einsum("irp,jsp->irjs", A, A)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_tiny_gpt2_conv1d_blocks_use_the_rule_and_match_the_dense_reference(dtype):
    lm = tiny_gpt2().eval()  # 1 layer, n_embd 16, 2 heads, vocab 12
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 4), generator=gen)
    y = torch.randint(0, VOCAB, (3, 4), generator=gen)
    loss = nn.CrossEntropyLoss()  # sequence CE: logits (m, T, V), targets (m, T)
    Kref = _lm_reference(_Logits(copy.deepcopy(lm).double()), ids, y, loss)
    conv1d = [k for k, mod in lm.named_modules() if isinstance(mod, Conv1D)]
    assert len(conv1d) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    rep = measure_curvature(
        lm.to(dtype),
        ids,
        y,
        loss,
        forward_fn=lambda model, x: model(input_ids=x).logits,
        sharpness="ggn",
        return_gram=True,
    )
    assert not any(b.startswith(tuple(conv1d)) for b in rep.fallback_blocks), rep.fallback_blocks
    # GPT-2 passes position ids (1, T): its positional embedding has no sample axis there
    assert set(rep.fallback_blocks) <= {"transformer.wpe.weight"} and rep.rechecked_blocks == {}
    assert _error(rep.gram, Kref) < (1e-11 if dtype == torch.float64 else 2e-5)
    assert rep.self_check_error < (1e-10 if dtype == torch.float64 else 2e-4)


def _pooled_tokens(self, module, x, grad, w, b):
    """Wrong: sums over tokens before the product, dropping the cross-token terms."""
    (p,) = Conv1DRule.correct(self, module, x, grad, w, b)
    p.a, p.d = p.a.sum(1, keepdim=True), p.d.sum(2, keepdim=True)
    return [p]


def _tokens_and_features_swapped(self, module, x, grad, w, b):
    """Wrong: the input's token and feature axes transposed (T = nx in this model)."""
    return Conv1DRule.correct(self, module, x.transpose(1, 2), grad, w, b)


def _bias_dropped(self, module, x, grad, w, b):
    """Wrong: the bias's constant input left out."""
    return Conv1DRule.correct(self, module, x, grad, w, False)


@pytest.mark.parametrize("broken", [_pooled_tokens, _tokens_and_features_swapped, _bias_dropped])
def test_self_check_catches_a_broken_conv1d_rule(monkeypatch, broken):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(3, 3), nn.Tanh(), Conv1D(4, 3), Head(4, 3)).double().eval()
    with torch.no_grad():  # off the zero-bias, tiny-weight initialisation
        for mod in (model[0], model[2]):
            mod.weight.normal_(0, 0.7)
            mod.bias.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (M,), generator=gen)
    loss = nn.CrossEntropyLoss()
    Kref = dense_gram(model, x, y, loss)
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert rep.fallback_blocks == {} and rep.rechecked_blocks == {}
    assert _error(rep.gram, Kref) < 1e-11

    monkeypatch.setattr(Conv1DRule, "correct", Conv1DRule.pieces, raising=False)
    monkeypatch.setattr(Conv1DRule, "pieces", broken)
    blind = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True, self_check=0)
    assert _error(blind.gram, Kref) > 0.02  # the broken rule is wrong: the test can fail
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert set(rep.rechecked_blocks) == {"0", "2"}, rep.rechecked_blocks
    assert min(rep.rechecked_blocks.values()) > 1e-3  # the float64 tolerance is 1e-8
    assert all("self-check" in rep.fallback_blocks[b] for b in ("0", "2"))
    assert _error(rep.gram, Kref) < 1e-11
