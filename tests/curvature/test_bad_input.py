"""Bad input to measure_curvature: a clear error naming the argument, the model left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_coherence._validation import NonFiniteError
from torch_coherence.curvature import measure_curvature

M = 5


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids).mean(1)))


def _mlp(c: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, c))


def _base():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(M, 4, generator=gen), torch.randint(0, 3, (M,), generator=gen)


def _set(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def case(name: str):
    """(model, inputs, targets, loss, exception type, message regex, before model code?)"""
    x, y = _base()
    ce = nn.CrossEntropyLoss()
    if name == "ce_label_out_of_range":
        return _mlp(), x, _set(y, (2,), 3), ce, ValueError, r"targets:.*\[0, 2\].*\[3\].*\[2\]", 0
    if name == "ce_label_negative":
        return _mlp(), x, _set(y, (1,), -2), ce, ValueError, r"targets:.*\[-2\].*samples \[1\]", 0
    if name == "ce_weighted_label_out_of_range":
        loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
        return _mlp(), x, _set(y, (0,), 5), loss, ValueError, r"targets:.*\[5\].*\[0\]", 0
    if name == "ce_float_labels":
        return _mlp(), x, y.float(), ce, TypeError, r"targets: CrossEntropyLoss needs class", 0
    if name == "nll_float_labels":
        return _mlp(), x, y.double(), nn.NLLLoss(), TypeError, r"targets: NLLLoss needs class", 0
    if name == "mse_target_would_broadcast":
        t = torch.randn(M)
        return _mlp(1), x, t, nn.MSELoss(), ValueError, r"targets: shape \(5,\).*\(5, 1\)", 0
    if name in ("embedding_id_out_of_range", "embedding_id_negative"):
        ids = torch.randint(0, 7, (M, 3), generator=torch.Generator().manual_seed(0))
        ids[3, 1] = 9 if name.endswith("range") else -1
        torch.manual_seed(0)
        v = 9 if name.endswith("range") else -1
        msg = rf"inputs: ids reaching embedding 'emb'.*\[0, 6\].*\[{v}\] at probe samples \[3\]"
        return Embed(), ids, y, ce, ValueError, msg, 0
    if name == "half_model_float32_inputs":
        msg = r"inputs: floating-point dtype torch.float32.*torch.float16"
        return _mlp().half(), x, y, ce, TypeError, msg, 0
    if name == "nan_inputs":
        bad = _set(_set(x, (3, 0), math.nan), (1, 2), math.nan)
        return _mlp(), bad, y, ce, NonFiniteError, r"inputs: NaN or infinite.*\[1, 3\]", None
    if name == "inf_inputs":
        return _mlp(), _set(x, (4, 1), math.inf), y, ce, NonFiniteError, r"samples \[4\]", None
    if name == "inf_weight":
        model = _mlp()
        with torch.no_grad():
            model[3].weight[0, 1] = math.inf
        return model, x, y, ce, NonFiniteError, r"model: parameter '3.weight' has 1 NaN", None
    if name == "nan_buffer":
        model = _mlp()
        model[1].running_var[2] = math.nan
        return model, x, y, ce, NonFiniteError, r"model: buffer '1.running_var'", None
    if name == "meta_model":
        return _mlp().to("meta"), x, y, ce, ValueError, r"model:.*meta device", None
    if name == "meta_inputs":
        return _mlp(), x.to("meta"), y, ce, ValueError, r"inputs: on \['meta'\]", None
    raise KeyError(name)


CASES = [
    "ce_label_out_of_range",
    "ce_label_negative",
    "ce_weighted_label_out_of_range",
    "ce_float_labels",
    "nll_float_labels",
    "mse_target_would_broadcast",
    "embedding_id_out_of_range",
    "embedding_id_negative",
    "half_model_float32_inputs",
    "nan_inputs",
    "inf_inputs",
    "inf_weight",
    "nan_buffer",
    "meta_model",
    "meta_inputs",
]


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_named_and_leaves_the_model_as_it_was(name):
    model, x, y, loss, exc, msg, _ = case(name)
    model.train()
    before = _state(model)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    with pytest.raises(exc, match=msg) as info:
        measure_curvature(model, x, y, loss)
    assert "preserved_state could not restore" not in str(info.value)
    assert not getattr(info.value, "__notes__", None)
    assert model.training and all(mod.training for mod in model.modules())
    after = _state(model)
    for k, v in before.items():
        if not v.is_meta:
            assert torch.equal(after[k], v) or (v.isnan() == after[k].isnan()).all(), k
    assert all(p.grad is None for p in model.parameters())
    if case(name)[-1] is None:  # rejected before any model code ran
        assert calls == []


def test_meta_model_restore_never_fails_and_keeps_the_real_error():
    """A failure inside preserved_state on a meta model: the block's error, train mode back."""
    from torch_coherence._state import preserved_state

    model = _mlp().to("meta")
    model.train()
    with pytest.raises(ZeroDivisionError), preserved_state(model):
        model.eval()
        raise ZeroDivisionError
    assert model.training
    with preserved_state(model):
        model(torch.randn(M, 4, device="meta"))
    assert model.training
