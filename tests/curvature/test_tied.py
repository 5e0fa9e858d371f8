"""The tied-weight rule (``layers.embedding``) on a small language model against jacrev.

An embedding whose weight is also the output layer's (an ``nn.Linear`` sharing it, or
``F.linear(h, emb.weight)``), with a padding index and positions: K from the engine for
random cotangents against the dense float64 reference, on both of the rule's paths (rows
when V d <= m R, the Gram root otherwise) and with the vocabulary cut into several slices.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from torch_coherence.curvature import measure_curvature
from torch_coherence.curvature.gram import gram_factors
from torch_coherence.curvature.layers import embedding

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class TiedLM(nn.Module):
    def __init__(self, vocab: int, d: int, T: int, functional: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=1)
        self.pos = nn.Embedding(T, d)
        self.mix = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.functional = functional
        if not functional:
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        h = self.ln(h + torch.tanh(self.mix(h)).cumsum(1) / 4)  # tokens interact
        return F.linear(h, self.tok.weight) if self.functional else self.head(h)


def _reference(model: nn.Module, ids: torch.Tensor, sqrt: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).double()
    named = {k: p.detach() for k, p in ref.named_parameters()}
    rows = []
    for i in range(ids.shape[0]):
        jac = jacrev(lambda p, i=i: functional_call(ref, p, (ids[i : i + 1],)).reshape(-1))(named)
        J = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], 1)  # (C, d)
        rows.append(sqrt[i].T @ J)
    A = torch.stack(rows)
    return torch.einsum("irp,jsp->irjs", A, A)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize(
    "vocab,d,R,chunk",
    [(5, 3, 5, None), (9, 4, 2, None), (9, 4, 2, 1)],
    ids=["rows", "root", "sliced"],
)
def test_tied_lm_gram_equals_dense_reference(monkeypatch, dtype, functional, vocab, d, R, chunk):
    if chunk is not None:
        monkeypatch.setattr(embedding, "TIED_CHUNK_BYTES", chunk)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m, T = 4, 3
    model = TiedLM(vocab, d, T, functional).eval()
    ids = torch.randint(0, vocab, (m, T), generator=gen)
    ids[0, 1] = 1  # a padding token
    sqrt = torch.randn(m, T * vocab, R, generator=gen, dtype=torch.float64)
    Kref = _reference(model, ids, sqrt)
    model = model.to(dtype)
    facs = gram_factors(model, ids, sqrt, dict(model.named_parameters()))
    err = float((facs.full() - Kref).abs().max() / Kref.abs().max())
    assert err < (1e-12 if dtype == torch.float64 else 2e-5), err
    assert facs.notes.fallback == {} and facs.notes.rechecked == {}
    assert facs.notes.check_error < (1e-10 if dtype == torch.float64 else 1e-4)


def test_tied_lm_probe_with_sampled_factors_uses_no_fallback():
    torch.manual_seed(0)
    model = TiedLM(13, 4, 5, functional=False).eval()
    ids = torch.randint(0, 13, (3, 5))
    y = torch.randint(0, 13, (3, 5))
    rep = measure_curvature(
        model, ids, y, nn.CrossEntropyLoss(), sharpness="ggn", factors="mc", mc_samples=2
    )
    assert rep.fallback_blocks == {} and rep.rechecked_blocks == {}
    assert rep.self_check_error < 1e-4 and rep.stats.sigma > 0


def test_other_reads_of_a_tied_weight_still_go_to_the_fallback():
    """``h @ emb.weight.T`` is not an ``F.linear`` read. The read watch does not see it (``.T``
    is a property read), so it is the self-check that sends the embedding to the fallback."""

    class MatmulTied(TiedLM):
        def forward(self, ids):
            return self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))) @ self.tok.weight.T

    torch.manual_seed(0)
    model = MatmulTied(7, 3, 3, functional=True).double().eval()
    ids = torch.randint(0, 7, (4, 3))
    sqrt = torch.randn(4, 21, 2, dtype=torch.float64)
    facs = gram_factors(model, ids, sqrt, dict(model.named_parameters()))
    assert "tok" in facs.notes.rechecked and facs.notes.rechecked["tok"] > 0.05
    Kref = _reference(model, ids, sqrt)
    assert float((facs.full() - Kref).abs().max() / Kref.abs().max()) < 1e-12
