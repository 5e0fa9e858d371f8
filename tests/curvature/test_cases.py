"""The case table (cases.py) against the dense float64 reference: K, and the Hessian sharpness."""

from __future__ import annotations

import pytest
import torch
from curvature.cases import CASES, LOSSES, dense_gram, dense_hessian_top, make_problem

from torch_coherence.curvature import measure_curvature

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: relative error of K against the float64 reference, by the probed model's dtype
K_TOL = {torch.float32: 2e-5, torch.float64: 1e-11}

#: blocks each case must send to the fallback up front (never more, never fewer)
EXPECTED_FALLBACK = {
    "lstm": {"rnn."},
    "gru": {"rnn."},
    "tied_module": {"head.bias"},  # the tied Linear's own bias
    "attention_zero_attn": {"attn."},  # add_zero_attn: no rule
    "bare_frozen": {"w"},
    "subclasses": {"scaled."},  # its own forward: the Linear rule does not apply
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("name", list(CASES))
def test_gram_equals_dense_reference(name, loss_name, dtype):
    model, ref, x, y, loss = make_problem(name, loss_name, dtype)
    Kref = dense_gram(ref, x, y, loss)
    rep = measure_curvature(model, x, y, loss, sharpness="ggn", return_gram=True)
    err = float((rep.gram - Kref).abs().max() / Kref.abs().max())
    assert err < K_TOL[dtype], (name, err, rep.fallback_blocks)
    assert rep.self_check_passes == 2 and rep.self_check_error < K_TOL[dtype] * 10
    # where the fallback was used, it is exactly the expected parameters
    prefixes = EXPECTED_FALLBACK.get(name, set())
    for block in rep.fallback_blocks:
        assert any(block.startswith(p) for p in prefixes), (block, rep.fallback_blocks)
    for p in prefixes:
        assert any(block.startswith(p) for block in rep.fallback_blocks), rep.fallback_blocks
    assert rep.rechecked_blocks == {}


@pytest.mark.parametrize(
    "name", ["mlp", "resblock_bn", "lstm", "encoder", "sdpa_causal", "relu_inplace", "tied"]
)
def test_hessian_sharpness_equals_double_backward(name):
    model, ref, x, y, loss = make_problem(name, "ce", torch.float64)
    top = dense_hessian_top(ref, x, y, loss)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rep = measure_curvature(model, x, y, loss, sharpness="hessian", tol=1e-12, max_hvps=d)
    assert rep.hessian_sharpness == pytest.approx(top, rel=1e-6, abs=1e-10)


def test_positional_embedding_shared_across_samples_uses_the_rule():
    """Without the sample axis the output is expanded at the broadcasting addition."""
    for name in ("positional", "positional_T_eq_m"):
        model, _, x, y, loss = make_problem(name, "ce", torch.float64)
        rep = measure_curvature(model, x, y, loss, sharpness=None)
        assert rep.fallback_blocks == {} and rep.rechecked_blocks == {}
