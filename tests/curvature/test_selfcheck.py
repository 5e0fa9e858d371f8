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
