"""The empirical lookahead: exact short runs on copies, the real run untouched bit for bit."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from torch_coherence._state import _bit_equal
from torch_coherence.lookahead import DEFAULT_REFINE, LookaheadResult, draw_batches, lookahead
from torch_coherence.optim import SAM


def _data(n: int = 48, d: int = 6, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
    )


def _make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def _train(model, opt, batches) -> None:
    loss = nn.CrossEntropyLoss()
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            value = loss(model(x), y)
            value.backward()
            return value

        opt.step(closure)


def _tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t.detach() for t in model.state_dict().values()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    for state in opt.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    base = getattr(opt, "base_optimizer", None)
    if base is not None:
        for state in base.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("kind", ["sgd_momentum", "adam", "sam"])
def test_real_run_untouched_bit_for_bit(kind: str) -> None:
    """Params, buffers, grads, optimizer state, modes and RNGs identical; training continues
    exactly as a twin that never ran the lookahead."""
    x, y = _data()
    ds = (x, y)
    runs = []
    for with_lookahead in (False, True):
        torch.manual_seed(5)
        np.random.seed(5)  # noqa: NPY002
        random.seed(5)
        model = _net()
        opt = _make_optimizer(kind, model)
        sampler = torch.Generator().manual_seed(7)
        _train(model, opt, draw_batches(ds, 16, 3, sampler))  # momentum buffers exist
        nn.CrossEntropyLoss()(model(x[:16]), y[:16]).backward()  # a live .grad
        before = [t.clone() for t in _tensors(model, opt)]
        rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
        if with_lookahead:
            probe_gen = torch.Generator().manual_seed(99)
            res = lookahead(
                model,
                opt,
                nn.CrossEntropyLoss(),
                draw_batches(ds, 16, 4, probe_gen),
                multiples=(1.0, 8.0, 64.0),
                refine=1,
            )
            assert isinstance(res, LookaheadResult)
            after = _tensors(model, opt)
            assert len(after) == len(before)
            assert all(_bit_equal(a, b) for a, b in zip(after, before, strict=True))
            assert torch.equal(torch.get_rng_state(), rng[0])
            assert np.array_equal(np.random.get_state()[1], rng[1])  # noqa: NPY002
            assert random.getstate() == rng[2]
            assert model.training
        _train(model, opt, draw_batches(ds, 16, 3, sampler))
        runs.append(_tensors(model, opt))
    assert all(_bit_equal(a, b) for a, b in zip(*runs, strict=True))


def test_eval_mode_is_kept_and_used() -> None:
    x, y = _data()
    model = _net().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = draw_batches((x, y), 16, 2, torch.Generator().manual_seed(0))
    res = lookahead(model, opt, nn.CrossEntropyLoss(), batches, multiples=(1.0,))
    with torch.no_grad():
        start = sum(float(nn.CrossEntropyLoss()(model(b[0]), b[1])) for b in batches) / 2
    assert res.loss_start == pytest.approx(start, rel=1e-12)  # eval mode: deterministic
    assert not model.training


@pytest.mark.parametrize("multiple", [1.0, 3.0])
def test_short_run_equals_a_manual_run(multiple: float) -> None:
    """loss_end is the mean batch loss after k manual steps at multiple x lr (momentum)."""
    x, y = _data()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, draw_batches((x, y), 16, 2, torch.Generator().manual_seed(1)))
    batches = draw_batches((x, y), 16, 5, torch.Generator().manual_seed(2))
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=1.0, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # own momentum buffers
    twin_opt.param_groups[0]["lr"] = 0.05 * multiple
    step_losses = []
    for bx, by in batches:  # _train, recording each step's loss at the weights before it
        twin_opt.zero_grad()
        value = nn.CrossEntropyLoss()(twin(bx), by)
        value.backward()
        twin_opt.step()
        step_losses.append(float(value.detach()))
    with torch.no_grad():
        expected = sum(float(nn.CrossEntropyLoss()(twin(b[0]), b[1])) for b in batches) / 5
    res = lookahead(model, opt, nn.CrossEntropyLoss(), batches, multiples=(multiple,))
    assert res.loss_end[0] == pytest.approx(expected, rel=1e-10)
    assert res.step_losses[0] == pytest.approx(step_losses, rel=1e-10)
    assert res.lr == 0.05 and res.steps == 5 and res.blew_up == (False,)
    assert math.isinf(res.blowup_lr) and not res.predicted


def _quadratic() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], float]:
    """Least squares: full-batch GD diverges above 2 / lambda_1(H), H = 2 X^T X / n."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.7, 0.5, 0.3], dtype=torch.float64
    )
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.5)
    hess = 2 * x.T @ x / 64
    return model, (x, y), 2.0 / float(torch.linalg.eigvalsh(hess)[-1])


def test_blowup_lr_brackets_the_gd_threshold() -> None:
    model, (x, y), lr_gd = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.5 * lr_gd)
    batches = [(x, y)] * 60  # full batch: exact GD
    res = lookahead(model, opt, nn.MSELoss(), batches, multiples=(1.0, 3.0, 6.0), refine=8)
    assert res.blew_up == (False, True, True)
    assert res.blowup_step[0] is None and res.blowup_step[2] < res.blowup_step[1]
    # 10x growth of the top mode within 60 steps needs |1 - lr lambda| > 10^(1/120)
    assert lr_gd < res.blowup_lr < 1.05 * lr_gd
    assert not res.predicted
    assert res.peak_loss[0] == pytest.approx(res.loss_start)  # GD at 0.5 lr_gd: loss falls
    assert res.peak_loss[1] > 10 * res.loss_start and res.peak_loss[2] > 10 * res.loss_start
    # the trace: the multiples in order, then 8 refine runs inside the bracket (1, 3)
    assert res.tested[:3] == ((1.0, False), (3.0, True), (6.0, True)) and len(res.tested) == 11
    assert all(1.0 < c < 3.0 for c, _ in res.tested[3:])
    assert res.blowup_lr == pytest.approx(min(c for c, b in res.tested if b) * res.lr)
    # a smaller refine gives the smallest blown-up multiple of the trace's first 3 + r runs
    for r in (0, 2, 5):
        short = lookahead(model, opt, nn.MSELoss(), batches, multiples=(1.0, 3.0, 6.0), refine=r)
        assert short.tested == res.tested[: 3 + r]
        replay = min(c for c, b in res.tested[: 3 + r] if b) * res.lr
        assert short.blowup_lr == pytest.approx(replay, rel=1e-12)
    res2 = lookahead(
        model,
        torch.optim.SGD(model.parameters(), lr=1.2 * lr_gd),
        nn.MSELoss(),
        batches,
        multiples=(1.0,),
    )
    assert res2.predicted and res2.blowup_lr == pytest.approx(1.2 * lr_gd)


def test_blowup_lr_brackets_from_below_when_the_current_lr_blows_up() -> None:
    model, (x, y), lr_gd = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=3 * lr_gd)
    res = lookahead(model, opt, nn.MSELoss(), [(x, y)] * 60, multiples=(1.0,), refine=9)
    assert res.blew_up == (True,) and res.predicted
    assert lr_gd < res.blowup_lr < 1.05 * lr_gd  # halved to 1.5, 0.75 x lr_gd, then bisected
    unrefined = lookahead(model, opt, nn.MSELoss(), [(x, y)] * 60, multiples=(1.0,), refine=0)
    assert unrefined.blowup_lr == pytest.approx(3 * lr_gd)


def test_default_refine_runs_only_when_something_blew_up() -> None:
    model, (x, y), lr_gd = _quadratic()
    batches = [(x, y)] * 60
    hot = torch.optim.SGD(model.parameters(), lr=3 * lr_gd)
    res = lookahead(model, hot, nn.MSELoss(), batches, multiples=(1.0,))
    assert len(res.tested) == 1 + DEFAULT_REFINE  # halved to 1.5, 0.75 x lr_gd, then bisected
    assert res.tested[:3] == ((1.0, True), (0.5, True), (0.25, False))
    assert lr_gd < res.blowup_lr < 1.5 * lr_gd
    calm = torch.optim.SGD(model.parameters(), lr=0.2 * lr_gd)
    res = lookahead(model, calm, nn.MSELoss(), batches)  # multiples (1, 2, 4): all stable
    assert res.tested == ((1.0, False), (2.0, False), (4.0, False)) and res.blowup_lr == math.inf


def test_zero_lr_is_never_a_blowup() -> None:
    model, (x, y), _ = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = lookahead(model, opt, nn.MSELoss(), [(x, y)] * 3)
    assert res.blew_up == (False, False, False) and math.isinf(res.blowup_lr)
    assert res.loss_end == pytest.approx((res.loss_start,) * 3) and not res.predicted


def test_non_finite_loss_is_a_blowup_and_forward_fn_is_used() -> None:
    model, (x, y), lr_gd = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=1e6 * lr_gd)
    calls = []

    def fwd(net, batch):
        calls.append(1)
        return net(batch["x"])

    res = lookahead(
        model,
        opt,
        nn.MSELoss(),
        [({"x": x}, y)] * 40,
        multiples=(1.0,),
        forward_fn=fwd,
        blowup_factor=math.inf,
    )
    assert res.blew_up == (True,) and calls
    assert not math.isfinite(res.loss_end[0])


def test_draw_batches_seeded_and_global_rng_untouched() -> None:
    x, y = _data(n=20)
    state = torch.get_rng_state()
    a = draw_batches((x, y), 8, 5, torch.Generator().manual_seed(4))
    b = draw_batches(torch.utils.data.TensorDataset(x, y), 8, 5, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == 5 and all(bx.shape == (8, 6) for bx, _ in a)
    for (ax, ay), (bx, by) in zip(a, b, strict=True):
        assert torch.equal(ax, bx) and torch.equal(ay, by)
    # first two batches come from one permutation: 16 distinct examples (no repeat)
    rows = torch.cat([a[0][0], a[1][0]])
    assert len({tuple(r.tolist()) for r in rows}) == 16
    c = draw_batches((x, y), 8, 5, torch.Generator().manual_seed(5))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multiples": ()}, "multiples"),
        ({"multiples": (1.0, -2.0)}, "multiples"),
        ({"multiples": (2.0, 2.0)}, "distinct"),
        ({"blowup_factor": 1.0}, "blowup_factor"),
        ({"refine": -1}, "refine"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    model, (x, y), _ = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        lookahead(model, opt, nn.MSELoss(), [(x, y)], **kwargs)


def test_bad_inputs() -> None:
    model, (x, y), _ = _quadratic()
    other = torch.optim.SGD(nn.Linear(5, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not parameters of model"):
        lookahead(model, other, nn.MSELoss(), [(x, y)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="batches"):
        lookahead(model, opt, nn.MSELoss(), [])
    with pytest.raises(TypeError, match="optimizer"):
        lookahead(model, "sgd", nn.MSELoss(), [(x, y)])
    with pytest.raises(TypeError, match="generator"):
        draw_batches((x, y), 4, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        draw_batches((x, y), 65, 2, torch.Generator())
    with pytest.raises(ValueError, match="same first dimension"):
        draw_batches((x, y[:3]), 2, 2, torch.Generator())


def test_lr_scheduler_patched_step_does_not_reach_the_real_optimizer() -> None:
    """An LR scheduler patches ``optimizer.step`` with a wrapper bound to the original."""
    x, y = _data()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert "step" in vars(opt)
    before = [p.detach().clone() for p in model.parameters()]
    res = lookahead(model, opt, nn.CrossEntropyLoss(), [(x, y)] * 3, multiples=(1.0,))
    assert res.loss_end[0] < res.loss_start  # the copy did train
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.state == {} or all(not s for s in opt.state.values())
