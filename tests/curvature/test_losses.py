"""Output-space Hessians and their square roots against torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from curvature.curv_cases import dense_lambda
from torch import nn

from torch_coherence.curvature.losses import (
    output_curvature,
    output_gradients,
    per_sample_losses,
)

M, C = 5, 4


def _case(loss, gen):
    out = torch.randn(M, C, generator=gen, dtype=torch.float64)
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        y = torch.randint(0, C, (M,), generator=gen)
        if isinstance(loss, nn.NLLLoss):
            out = out.log_softmax(1)
    elif isinstance(loss, nn.BCEWithLogitsLoss):
        y = torch.randint(0, 2, (M, C), generator=gen).double()
    else:
        y = torch.randn(M, C, generator=gen, dtype=torch.float64)
    return out, y


LOSSES = [
    nn.CrossEntropyLoss(),
    nn.CrossEntropyLoss(label_smoothing=0.2),
    nn.CrossEntropyLoss(reduction="sum"),
    nn.MSELoss(),
    nn.MSELoss(reduction="sum"),
    nn.BCEWithLogitsLoss(),
    nn.BCEWithLogitsLoss(reduction="sum"),
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda fn: f"{type(fn).__name__}-{fn.reduction}")
def test_per_sample_mean_is_training_loss_and_lambda_is_its_hessian(loss, gen):
    out, y = _case(loss, gen)
    ls = per_sample_losses(loss, out, y)
    expected = loss(out, y) / (M if loss.reduction == "sum" else 1)
    torch.testing.assert_close(ls.mean(), expected, rtol=1e-12, atol=1e-12)

    def one(o, t):
        return loss(o[None], t[None])  # one-sample training loss

    lam = dense_lambda(one, out, y)
    B = output_curvature(loss, out, y).sqrt
    torch.testing.assert_close(B @ B.transpose(1, 2), lam, rtol=1e-10, atol=1e-12)
    g = output_gradients(loss, out, y)
    gref = torch.func.vmap(torch.func.grad(one))(out, y)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)


def test_weighted_ce_scale(gen):
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    loss = nn.CrossEntropyLoss(weight=w)
    out, y = _case(loss, gen)
    s = w[y] * M / w[y].sum()
    plain = output_curvature(nn.CrossEntropyLoss(), out, y).sqrt
    B = output_curvature(loss, out, y).sqrt
    torch.testing.assert_close(
        B @ B.transpose(1, 2), (plain @ plain.transpose(1, 2)) * s.view(M, 1, 1)
    )
    ls = per_sample_losses(loss, out, y)
    torch.testing.assert_close(ls.mean(), loss(out, y))


def test_label_smoothing_leaves_lambda_unchanged(gen):
    out, y = _case(nn.CrossEntropyLoss(), gen)
    a = output_curvature(nn.CrossEntropyLoss(), out, y).sqrt
    b = output_curvature(nn.CrossEntropyLoss(label_smoothing=0.3), out, y).sqrt
    torch.testing.assert_close(a, b)
    p = out.softmax(1)
    torch.testing.assert_close(
        a @ a.transpose(1, 2), torch.diag_embed(p) - p[:, :, None] * p[:, None]
    )


def test_nll_on_log_probs_gives_the_logit_ggn(gen):
    """CE Lambda on z = log_softmax(logits): J_z^T Lambda J_z = Lambda since Lambda 1 = 0."""
    logits = torch.randn(M, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (M,), generator=gen)
    z = logits.log_softmax(1)
    B = output_curvature(nn.NLLLoss(), z, y).sqrt
    lam = B @ B.transpose(1, 2)
    Jz = torch.func.vmap(torch.func.jacrev(lambda t: t.log_softmax(0)))(logits)
    ce = dense_lambda(lambda o, t: nn.functional.cross_entropy(o[None], t[None]), logits, y)
    torch.testing.assert_close(Jz.transpose(1, 2) @ lam @ Jz, ce, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_sample_losses(nn.NLLLoss(), z, y).mean(), nn.NLLLoss()(z, y))


def test_callable_loss_clips_negative_eigenvalues(gen):
    out = torch.randn(M, C, generator=gen, dtype=torch.float64)
    y = torch.randn(M, C, generator=gen, dtype=torch.float64)

    def nonconvex(o, t):  # Hessian diag(cos(o - t)): indefinite
        return torch.sum(-torch.cos(o - t))

    oc = output_curvature(nonconvex, out, y)
    c = torch.cos(out - y)
    torch.testing.assert_close(oc.sqrt @ oc.sqrt.transpose(1, 2), torch.diag_embed(c.clamp_min(0)))
    assert oc.clipped == pytest.approx(float(c.min()))

    def sq(o, t):
        return ((o - t) ** 2).sum()

    oc = output_curvature(sq, out, y)
    assert oc.clipped == 0.0
    torch.testing.assert_close(
        oc.sqrt @ oc.sqrt.transpose(1, 2), 2 * torch.eye(C, dtype=torch.float64).expand(M, C, C)
    )


def test_unsupported_and_invalid_losses():
    from torch_coherence.curvature.losses import check_loss

    with pytest.raises(TypeError, match=r"supported.*callable"):
        check_loss(nn.L1Loss())
    with pytest.raises(TypeError):
        check_loss(3)
    with pytest.raises(ValueError, match="reduction"):
        check_loss(nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="pos_weight"):
        check_loss(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)))
    with pytest.raises(ValueError, match="label_smoothing"):
        check_loss(nn.CrossEntropyLoss(weight=torch.ones(3), label_smoothing=0.1))
    with pytest.raises(ValueError, match="ignore_index"):
        per_sample_losses(nn.CrossEntropyLoss(), torch.zeros(3, 2), torch.tensor([0, -100, 1]))
