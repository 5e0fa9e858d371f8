"""The self-check catches each silent failure of the layer rules when its guard is switched off.

Each failure mode is reproduced with the engine's up-front guard disabled (``gram.SAFEGUARDS``):
without the self-check the Gram is wrong (the test can fail), with it the wrong block is named
in ``rechecked_blocks`` and recomputed, and K equals the dense reference again.
"""

from __future__ import annotations

import math

import pytest
import torch
from curvature.cases import dense_gram, make_problem
from torch import nn

from torch_coherence.curvature import gram, measure_curvature
from torch_coherence.curvature.layers import linear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _error(rep, Kref):
    return float((rep.gram - Kref).abs().max() / Kref.abs().max())


MODES = {
    # silent failure: (case, guards switched off, blocks the check must find)
    "inplace_activation": ("relu_inplace", ["copy_outputs"], {"0"}),
    "read_outside_module": ("tied", ["watch_reads"], {"emb"}),
    "shared_output_without_sample_axis": ("positional_T_eq_m", ["expand_shared"], {"pos"}),
    "compiled_graph": (
        "compiled",
        ["unwrap_compiled", "watch_reads", "missing_calls"],
        {"_orig_mod.0", "_orig_mod.2"},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", list(MODES))
def test_self_check_catches_failure_mode(monkeypatch, mode, dtype):
    case, guards, blocks = MODES[mode]
    model, ref, x, y, loss = make_problem(case, "ce", dtype)
    Kref = dense_gram(ref, x, y, loss)
    for g in guards:
        monkeypatch.setitem(gram.SAFEGUARDS, g, False)
    if mode == "compiled_graph":
        torch._dynamo.reset()  # no graphs cached by earlier tests
        model(x)  # compiled before the probe (as after training): the cached graph has no hooks
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert set(rep.rechecked_blocks) == blocks
    assert min(rep.rechecked_blocks.values()) > 0.05
    assert all("self-check" in rep.fallback_blocks[b] for b in blocks)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert _error(rep, Kref) < tol and rep.self_check_error < tol
    if mode != "compiled_graph":  # (a second call of a compiled model may retrace with hooks)
        blind = measure_curvature(
            model, x, y, loss, sharpness="ggn", return_gram=True, self_check=0
        )
        assert _error(blind, Kref) > 0.02  # what the check prevented
        assert math.isnan(blind.self_check_error) and blind.self_check_passes == 0


@pytest.mark.parametrize("scale", [1.01, 0.999])
def test_self_check_catches_a_deliberately_wrong_rule(monkeypatch, scale):
    model, ref, x, y, loss = make_problem("cnn", "mse", torch.float64)
    Kref = dense_gram(ref, x, y, loss)
    original = linear.LinearRule.pieces

    def wrong(self, module, x, grad, w, b):
        pieces = original(self, module, x, grad, w, b)
        return [gram.Piece(a=p.a, d=p.d * scale, ones=p.ones) for p in pieces]

    monkeypatch.setattr(linear.LinearRule, "pieces", wrong)
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert set(rep.rechecked_blocks) == {"head.out"}  # the conv block is right and kept
    assert rep.rechecked_blocks["head.out"] == pytest.approx(abs(scale**2 - 1), rel=0.5)
    assert _error(rep, Kref) < 1e-11
    blind = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True, self_check=0)
    assert _error(blind, Kref) > 5e-4


class Coupled(nn.Module):
    """Samples are not independent (x - mean over the batch): no per-sample GGN exists."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0, keepdim=True)) * torch.tanh(self.lin.weight.sum())


def test_self_check_raises_when_even_the_fallback_disagrees():
    torch.manual_seed(0)
    model = Coupled().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match=r"self-check: block 'lin\.weight'.*independent"):
        measure_curvature(model, x, y, nn.CrossEntropyLoss(), sharpness="ggn")
    assert model.training  # the state is restored on the error


def test_check_cost_is_the_number_of_vectors():
    model, _, x, y, loss = make_problem("mlp", "ce", torch.float64)
    for v in (1, 3):
        rep = measure_curvature(model, x, y, loss, sharpness=None, self_check=v)
        assert rep.self_check_passes == v and rep.self_check_error < 1e-12
    with pytest.raises(ValueError, match="self_check"):
        measure_curvature(model, x, y, loss, self_check=-1)


def test_attention_rule_declines_when_its_forward_does_not_reproduce_the_module(monkeypatch):
    """The re-implemented attention is compared with the module's own output on every call."""
    from torch_coherence.curvature.layers import attention

    model, ref, x, y, loss = make_problem("attention_masked", "ce", torch.float64)
    Kref = dense_gram(ref, x, y, loss)
    monkeypatch.setattr(attention, "_additive", lambda mask, dtype: None)  # masks forgotten
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert rep.fallback_blocks["attn.in_proj_weight"].startswith("the attention re-implementation")
    assert rep.rechecked_blocks == {} and _error(rep, Kref) < 1e-11


def test_self_check_catches_a_subclass_forward_the_registry_let_through(monkeypatch):
    """A subclass overriding ``forward`` goes to the fallback up front; were the MRO lookup to
    give it its base's rule anyway (the guard in ``registered_base`` removed), the Linear rule
    would describe the wrong function, and the self-check names and recomputes that block."""
    from torch_coherence.curvature import layers

    model, ref, x, y, loss = make_problem("subclasses", "ce", torch.float64)
    Kref = dense_gram(ref, x, y, loss)
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert set(rep.fallback_blocks) == {"scaled.weight", "scaled.bias"}
    assert rep.rechecked_blocks == {} and _error(rep, Kref) < 1e-11

    def mro_only(cls):
        return next((b for b in cls.__mro__ if b in layers.REGISTRY), None)

    monkeypatch.setattr(layers, "registered_base", mro_only)
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert set(rep.rechecked_blocks) == {"scaled"} and rep.rechecked_blocks["scaled"] > 0.05
    assert _error(rep, Kref) < 1e-11
    blind = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True, self_check=0)
    assert _error(blind, Kref) > 0.02


def test_registry_follows_the_mro_only_without_an_own_forward():
    from torch.distributed.fsdp import FSDPModule

    from torch_coherence.curvature.layers import find_rule
    from torch_coherence.curvature.layers.linear import LinearRule
    from torch_coherence.curvature.layers.norm import NormRule

    lin = nn.Linear(3, 3)
    lin.__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})  # what fully_shard does
    assert isinstance(find_rule(lin), LinearRule)

    class Norm(nn.LayerNorm):
        pass

    class Own(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class OwnChild(Own):  # inherits a forward that is not LayerNorm's
        pass

    assert isinstance(find_rule(Norm(3)), NormRule)
    assert find_rule(Own(3)) is None and find_rule(OwnChild(3)) is None
    assert find_rule(nn.MultiheadAttention(4, 2).out_proj) is None  # its parent reads it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["tied", "tied_module"])
def test_tied_rule_sums_both_uses_and_the_check_catches_dropped_cross_terms(
    monkeypatch, case, dtype
):
    """The tied weight's rows are the sum of the embedding's and the linear read's rows; a rule
    that adds the two uses' Grams instead (no cross terms) is caught and recomputed."""
    from torch_coherence.curvature.layers import embedding

    model, ref, x, y, loss = make_problem(case, "ce", dtype)
    Kref = dense_gram(ref, x, y, loss)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    monkeypatch.setattr(embedding, "TIED_CHUNK_BYTES", 1)  # one vocabulary entry a slice
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert "emb.weight" not in rep.fallback_blocks and rep.rechecked_blocks == {}
    assert _error(rep, Kref) < tol

    original = embedding.tied_rows

    def no_cross(emb, lin, v0, v1, dim):
        one, two = original(emb, [], v0, v1, dim), original([], lin, v0, v1, dim)
        return torch.cat([one, two], 3)  # |G_E|^2 + |G_L|^2 instead of |G_E + G_L|^2

    monkeypatch.setattr(embedding, "tied_rows", no_cross)
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    assert set(rep.rechecked_blocks) == {"emb"} and rep.rechecked_blocks["emb"] > 0.01
    assert _error(rep, Kref) < tol
    blind = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True, self_check=0)
    assert _error(blind, Kref) > 0.01
