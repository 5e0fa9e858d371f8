"""Case table of tiny models for the curvature engine, with an independent dense reference.

Each case builds a model, a probe batch and the number of outputs C; the reference is the
per-sample GGN from ``torch.func.jacrev`` taken one sample at a time in float64 (a Python loop:
no ``vmap``, so it shares nothing with the engine's fallback) times the loss's exact B_i, and
the true Hessian of the mean loss by double backward. One row per architecture or layer rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from torch_coherence.curvature.losses import output_curvature

M = 5  # probe size of every case


class Head(nn.Module):
    """Pools a (m, T, d) or (m, c, h, w) feature map and maps it to C outputs."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.out = nn.Linear(d, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(h.flatten(2).mean(2) if h.dim() == 4 else h.mean(1)))


class Conv(nn.Module):
    def __init__(self, conv: nn.Conv2d, c: int) -> None:
        super().__init__()
        self.conv, self.head = conv, Head(conv.out_channels, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = Head(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.stem(x)))
        return self.head(F.relu(h + self.bn2(self.conv(h))))


class Recurrent(nn.Module):
    def __init__(self, cell: type, c: int) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.out = nn.Linear(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


class Tied(nn.Module):
    """GPT-style weight tying: the output layer reads the embedding's weight directly."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(c, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(ids).mean(1)))
        return F.linear(h, self.emb.weight)


class TiedModule(nn.Module):
    """Tying through an ``nn.Linear`` whose weight is the embedding's (V d > m R: the Gram
    root path of the tied rule), with a bias of its own and a positional embedding."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(c, 8, padding_idx=0)
        self.pos = nn.Embedding(3, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, c)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(self.mix(h)).mean(1))


class Positional(nn.Module):
    """Token embedding plus a positional embedding of ``torch.arange(T)`` (no batch axis)."""

    def __init__(self, c: int, T: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(T, 4)
        self.head = Head(4, c)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))


class Encoder(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = Head(8, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.inp(x)))


class Attention(nn.Module):
    """MultiheadAttention called with masks: causal (bool), key padding from the input."""

    def __init__(self, c: int, batch_first: bool = False, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, **kw)
        self.inp = nn.Linear(3, 6)
        self.head = Head(6, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        pad = x[:, :, 0] > 0.8
        pad[:, 0] = False
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        if self.attn.batch_first:
            a = self.attn(h, h, h, attn_mask=causal, key_padding_mask=pad)[0]
        else:
            t = h.transpose(0, 1)
            a = self.attn(t, t, t, attn_mask=causal, key_padding_mask=pad)[0].transpose(0, 1)
        return self.head(a)


class SDPA(nn.Module):
    """A GPT-style causal self-attention block calling ``F.scaled_dot_product_attention``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(3, 12)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = Head(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(self.norm(self.proj(a.transpose(1, 2).reshape(x.shape[0], -1, 4))))


class CompiledInside(nn.Module):
    """A model whose submodule was ``torch.compile``d (``self.body = torch.compile(body)``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 6))
        self.body = torch.compile(body, backend="aot_eager")
        self.out = nn.Linear(6, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.body(x)))


class Bare(nn.Module):
    """A bare parameter used directly, a frozen Linear and a LayerNorm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.frozen(x) @ self.w)))


class Norms(nn.Module):
    """Affine parameters of LayerNorm, RMSNorm and (eval-mode) BatchNorm1d."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.rms = nn.RMSNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.rms(torch.tanh(self.ln(self.inp(x)))))))


class MyLinear(nn.Linear):
    """A subclass that keeps ``nn.Linear.forward`` (as FSDP2's ``FSDPLinear`` does)."""


class MyConv(nn.Conv2d):
    pass


class MyNorm(nn.LayerNorm):
    pass


class ScaledLinear(nn.Linear):
    """A subclass with its own ``forward``: the Linear rule does not describe it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x) + 0.5 * torch.tanh(x).sum(-1, keepdim=True)


class Subclasses(nn.Module):
    """Subclasses of covered types: inherited ``forward`` (covered) and an overriding one."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = MyConv(2, 3, 3, padding=1)
        self.norm = MyNorm(3)
        self.lin = MyLinear(3, 4)
        self.scaled = ScaledLinear(4, 4)
        self.out = MyLinear(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # (m, positions, channels)
        h = torch.tanh(self.lin(self.norm(h))).mean(1)
        return self.out(torch.tanh(self.scaled(h)))


class HFConv1D(nn.Module):
    """Two Hugging Face ``Conv1D`` layers (transposed weights) on a (m, T, d) input, the second
    a subclass inheriting ``forward``; the case is skipped without ``transformers``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        import pytest

        Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

        class MyConv1D(Conv1D):
            pass

        self.fc, self.proj, self.head = Conv1D(6, 4), MyConv1D(5, 6), Head(5, c)
        with torch.no_grad():  # off the zero-bias, tiny-weight initialisation
            for mod in (self.fc, self.proj):
                mod.weight.normal_(0, 0.5)
                mod.bias.normal_(0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(torch.tanh(self.fc(x))))


def _float(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(M, *shape, generator=g)


def _ids(vocab: int, T: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, vocab, (M, T), generator=g)


@dataclass(frozen=True)
class Case:
    """A model factory ``build(C)``, an input factory and whether the case is compiled."""

    build: Callable[[int], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    compiled: bool = False


def _seq(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(*mods)


CASES: dict[str, Case] = {
    "mlp": Case(lambda c: _seq(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, c)), _float(4)),
    "cnn": Case(lambda c: Conv(nn.Conv2d(2, 3, 3, padding=1, stride=2), c), _float(2, 5, 5)),
    "resblock_bn": Case(ResBlock, _float(2, 4, 4)),
    "lstm": Case(lambda c: Recurrent(nn.LSTM, c), _float(3, 3)),
    "gru": Case(lambda c: Recurrent(nn.GRU, c), _float(3, 3)),
    "conv_groups": Case(lambda c: Conv(nn.Conv2d(4, 6, 3, groups=2), c), _float(4, 4, 4)),
    "conv_depthwise": Case(lambda c: Conv(nn.Conv2d(3, 3, 3, groups=3), c), _float(3, 4, 4)),
    "conv_same": Case(lambda c: Conv(nn.Conv2d(2, 3, 3, padding="same"), c), _float(2, 4, 4)),
    "conv_circular": Case(
        lambda c: Conv(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), c),
        _float(2, 4, 4),
    ),
    "relu_inplace": Case(
        lambda c: _seq(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, c)), _float(4)
    ),
    "tied": Case(Tied, _ids(3, 3)),
    "tied_module": Case(TiedModule, _ids(3, 3)),
    "positional_T_eq_m": Case(lambda c: Positional(c, M), _ids(7, M)),
    "positional": Case(lambda c: Positional(c, 3), _ids(7, 3)),
    "encoder": Case(Encoder, _float(3, 3)),
    "attention_masked": Case(Attention, _float(4, 3)),
    "attention_zero_attn": Case(lambda c: Attention(c, True, add_zero_attn=True), _float(4, 3)),
    "sdpa_causal": Case(SDPA, _float(4, 3)),
    "bare_frozen": Case(Bare, _float(4)),
    "norms": Case(Norms, _float(4)),
    "compiled_submodule": Case(CompiledInside, _float(4)),
    "subclasses": Case(Subclasses, _float(2, 3, 3)),
    "conv1d_hf": Case(HFConv1D, _float(3, 4)),
    "compiled": Case(
        lambda c: _seq(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, c)), _float(4), compiled=True
    ),
}

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
}


def make_problem(
    name: str, loss_name: str, dtype: torch.dtype, c: int = 3, seed: int = 0
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """(model to probe, float64 eager reference copy, inputs, targets, loss).

    BatchNorm running statistics are moved off their defaults by a few train-mode passes.
    """
    case = CASES[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = case.build(c)
    x = case.inputs(gen)
    if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x * 2 + 0.5 if x.is_floating_point() else x)
    model.eval()
    ref = copy.deepcopy(model).double()
    if isinstance(getattr(ref, "body", None), torch._dynamo.eval_frame.OptimizedModule):
        ref.body = ref.body._orig_mod  # the reference runs eagerly
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    loss = LOSSES[loss_name]()
    if loss_name == "ce":
        y = torch.randint(0, c, (M,), generator=gen)
    else:
        y = torch.randn(M, c, generator=gen, dtype=dtype)
    if case.compiled:
        model = torch.compile(model, backend="aot_eager")
    return model, ref, x, y, loss


def dense_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module):
    """Per-sample factors A_i = B_i^T J_i (m, R, d), trainable parameters in order, float64."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    pv = {k: p.detach().double() for k, p in named.items()}
    xd = x.double() if x.is_floating_point() else x
    rows = []
    for i in range(xd.shape[0]):

        def f(p, i=i):
            return functional_call(model, p, (xd[i : i + 1],)).reshape(-1)

        jac = jacrev(f)(pv)
        rows.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in named], 1))
    J = torch.stack(rows)
    with torch.no_grad():
        out = model(xd)
    yd = y.double() if y.is_floating_point() else y
    B = output_curvature(loss, out, yd).sqrt
    return B.transpose(1, 2) @ J


def dense_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module):
    """K_{ir,js} = A_ir . A_js from :func:`dense_factors`."""
    A = dense_factors(model, x, y, loss)
    return torch.einsum("irp,jsp->irjs", A, A)


def dense_hessian_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module):
    """lambda_1 of the Hessian of the mean loss, the Hessian formed by double backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    xd = x.double() if x.is_floating_point() else x
    yd = y.double() if y.is_floating_point() else y
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        val = loss(model(xd), yd)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(val, params, create_graph=True)])
        H = torch.stack(
            [
                torch.cat(
                    [t.reshape(-1) for t in torch.autograd.grad(g[k], params, retain_graph=True)]
                )
                for k in range(g.numel())
            ]
        )
    return float(torch.linalg.eigvalsh(0.5 * (H + H.T))[-1])
