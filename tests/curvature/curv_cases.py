"""Tiny float64 models, problem cases and the dense per-sample GGN reference."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from torch_coherence.curvature.losses import output_curvature


class Bilinear(nn.Module):
    """A custom module (fallback path): x -> (x W) * tanh(x), LayerNorm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm((x @ self.w) * torch.tanh(x))


def mlp(d_in: int = 5, hidden: int = 6, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, c))


def mixed(d_in: int = 5, c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 4), Bilinear(4), nn.Linear(4, c))


def seq_model(c: int = 3) -> nn.Module:
    """Linear on a (m, T, d) input (sequence axis), then flatten."""
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, c))


def cnn(c: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, c),
    )


def cnn1d(c: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, c))


class EmbedModel(nn.Module):
    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.out = nn.Linear(12, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)).flatten(1))


def make_inputs(kind: str, m: int, gen: torch.Generator) -> torch.Tensor:
    shapes = {
        "mlp": (m, 5),
        "mixed": (m, 5),
        "seq": (m, 3, 4),
        "cnn": (m, 2, 5, 5),
        "cnn1d": (m, 2, 7),
    }
    if kind == "embed":
        return torch.randint(0, 7, (m, 3), generator=gen)
    return torch.randn(*shapes[kind], generator=gen, dtype=torch.float64)


MODELS = {
    "mlp": mlp,
    "mixed": mixed,
    "seq": seq_model,
    "cnn": cnn,
    "cnn1d": cnn1d,
    "embed": EmbedModel,
}


def make_targets(loss: nn.Module, m: int, c: int, gen: torch.Generator) -> torch.Tensor:
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return torch.randint(0, c, (m,), generator=gen)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        return torch.randint(0, 2, (m, c), generator=gen).double()
    return torch.randn(m, c, generator=gen, dtype=torch.float64)


def dense_ggn(model, inputs, targets, loss, params=None):
    """Per-sample factors A_i = B_i^T J_i (m, R, d) from jacrev and the loss's exact B_i."""
    named = dict(model.named_parameters())
    names = list(named) if params is None else list(params)
    pv = {k: named[k].detach() for k in names}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),), strict=False).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(pv, inputs)
    J = torch.cat([jac[k].reshape(jac[k].shape[0], jac[k].shape[1], -1) for k in names], 2)
    with torch.no_grad():
        out = model(inputs)
    B = output_curvature(loss, out, targets).sqrt
    return B.transpose(1, 2) @ J.double()


def dense_lambda(loss_fn, outputs, targets):
    """Lambda_i by torch.func.hessian of a per-sample loss."""
    return vmap(hessian(loss_fn))(outputs, targets)
