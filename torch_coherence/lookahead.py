r"""Empirical lookahead: does training blow up in the next k steps at this learning rate?

The linearized criteria of ``docs/theory.md`` §4-5 describe SGD at fixed weights; a real
network leaves that neighbourhood (``docs/theory.md`` §8), and the lr at which real runs blow
up can differ from the linear thresholds by a factor of 2-3. The lookahead measures the
nonlinear outcome directly: it runs ``k = len(batches)`` real optimizer steps on a *copy* of
the model and of the optimizer, at the current learning rate times each of a few
``multiples``, and reports which of those short runs blew up.

For a multiple c the copy's every param group gets ``lr <- c * lr`` (momentum buffers, Adam
moments, SAM's base optimizer and everything else in the optimizer state are copied, not
reset). A short run **blows up** when a step's mini-batch loss or the final loss is
non-finite or above ``blowup_factor * loss_start``, with

.. math::

    \text{loss\_start} = \frac1k \sum_{t<k} \ell(w_0; B_t), \qquad
    \text{loss\_end}   = \frac1k \sum_{t<k} \ell(w_k; B_t)

(the mean loss over the lookahead batches at the starting and at the final weights, in the
model's own train/eval mode). A short run stops at its first blown-up step.

``blowup_lr`` is the smallest tested ``c * lr`` that blew up (``inf`` when none did). With
``refine > 0`` up to ``refine`` more short runs sharpen it: when even the smallest multiple
blew up, the multiple is halved until a short run is stable (bracketing from below), then the
bracket between the largest stable and the smallest unstable multiple is bisected
geometrically with the remaining runs. ``LookaheadResult.predicted`` is the
blow-up prediction: the run at ``PREDICTION_MULTIPLE * lr`` (by default the current lr)
blew up, i.e. ``blowup_lr <= PREDICTION_MULTIPLE * lr``. How often this is right on real
training runs is measured by ``benchmarks/bench_warnings.py`` (``docs/warnings.md``): the
default is two lookaheads with ``multiples=(1.0,)`` on independent draws of
``DEFAULT_STEPS = (10, 10)`` batches, a blow-up of either predicting one. On held-out seeds
that gave recall 98-100% with 2% false alarms on a digits MLP and an MSE net, but 82% with
4% on a momentum CNN, which misses the 90% / 10% target (so did every other number of draws
and k on the development seeds); testing 2x the lr gave 24-60% false alarms.

The real run is left alone bit for bit: parameters, buffers, ``.grad``, optimizer state,
train/eval flags and the torch (CPU and CUDA), numpy and Python RNG states are exactly as
before (:func:`torch_coherence._state.preserved_state`). The copies are made with
:func:`copy.deepcopy` of the model and ``Optimizer.__getstate__`` of the optimizer, sharing
one memo so the copied optimizer points at the copied parameters; instance attributes that
are callables (an LR scheduler's patched ``step`` would act on the *original* optimizer)
are dropped, nested optimizers (SAM's ``base_optimizer``) are copied the same way. LR
schedulers are not stepped: the lr is constant over the k steps.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ._state import preserved_state
from ._validation import check_positive, check_sample_count

__all__ = [
    "DEFAULT_REFINE",
    "DEFAULT_STEPS",
    "LookaheadResult",
    "PREDICTION_MULTIPLE",
    "draw_batches",
    "lookahead",
]

#: ``predicted`` is true when the short run at this multiple of the current lr blew up
#: (chosen by ``benchmarks/bench_warnings.py``; see ``docs/warnings.md``: at 2x the false
#: alarms were 26-49% per setup).
PREDICTION_MULTIPLE = 1.0

#: The default pre-flight rule (measured in ``docs/warnings.md``; on a momentum CNN it misses
#: the recall target): two lookaheads at the current lr (``multiples=(1.0,)``) on
#: independent draws of this many batches from the probe's generator; a blow-up predicted by
#: either one predicts a blow-up of the real run.
DEFAULT_STEPS = (10, 10)

#: Default ``refine`` of :func:`lookahead`: extra short runs that sharpen ``blowup_lr`` when
#: a tested multiple blew up (none when nothing did, so a calm lookahead costs nothing more).
#: With the probe's bracket (k = 10, multiples 1, 2, 4) it took ``stability/blowup_lr``
#: within 1.5x of the empirical blow-up lr from 20-31 to 55-59 of 60 runs per batch size on
#: the digits MLP (``docs/warnings.md``).
DEFAULT_REFINE = 3

Batch = tuple[Any, Any]


@dataclass(frozen=True)
class LookaheadResult:
    """Outcome of :func:`lookahead`.

    Attributes:
        lr: the optimizer's current learning rate (of its first param group).
        multiples: the tested multiples of ``lr``, ascending.
        loss_start: mean loss over the lookahead batches at the current weights.
        loss_end: per multiple, the mean loss over the batches at the final weights (or the
            blown-up step's loss when that short run stopped early).
        blew_up: per multiple, whether that short run blew up.
        blowup_lr: the smallest tested lr that blew up, refined by bisection when asked;
            ``inf`` when none blew up.
        steps: k, the optimizer steps of each short run.
        seconds: wall time of the whole lookahead.
        blowup_step: per multiple, the step at which the short run blew up (``k`` when only
            the final loss was too large), or None.
        peak_loss: per multiple, the largest loss seen (step losses and ``loss_end``; inf
            when one was not finite): ``peak_loss / loss_start`` above any factor up to
            ``blowup_factor`` tells whether a smaller factor would have called it a blow-up.
        tested: every short run in the order it ran, as ``(multiple, blew_up)``: the
            ``multiples`` first, then the ``refine`` runs. ``blowup_lr / lr`` is the smallest
            blown-up multiple among them, so a smaller ``refine`` r would have given the
            smallest blown-up multiple among the first ``len(multiples) + r``.
        step_losses: per multiple, the mini-batch loss of each step taken (at the weights
            before that step; up to and including a blown-up step).
    """

    lr: float
    multiples: tuple[float, ...]
    loss_start: float
    loss_end: tuple[float, ...]
    blew_up: tuple[bool, ...]
    blowup_lr: float
    steps: int
    seconds: float
    blowup_step: tuple[int | None, ...] = ()
    peak_loss: tuple[float, ...] = ()
    tested: tuple[tuple[float, bool], ...] = ()
    step_losses: tuple[tuple[float, ...], ...] = ()

    @property
    def predicted(self) -> bool:
        """The blow-up prediction: ``blowup_lr <= PREDICTION_MULTIPLE * lr``."""
        return self.lr > 0 and self.blowup_lr <= PREDICTION_MULTIPLE * self.lr * (1 + 1e-12)


# --------------------------------------------------------------------------- batches


def _is_tensor_pair(dataset: object) -> bool:
    return (
        isinstance(dataset, (tuple, list))
        and len(dataset) == 2
        and all(isinstance(t, torch.Tensor) for t in dataset)
    )


def draw_batches(
    dataset: Any, batch_size: int, steps: int, generator: torch.Generator
) -> list[Batch]:
    """``steps`` mini-batches of ``batch_size`` examples drawn with ``generator`` only.

    Sampling is that of a shuffled ``DataLoader`` with ``drop_last=True``: consecutive
    slices of a random permutation, a fresh permutation when fewer than ``batch_size``
    indices are left. The global RNG is never consumed.

    Args:
        dataset: a map-style dataset whose items are ``(x, y)`` (collated with
            ``torch.utils.data.default_collate``), or an ``(inputs, targets)`` tensor pair
            with equal first dimensions.
        batch_size: examples per batch, 1 <= batch_size <= len(dataset).
        steps: number of batches (>= 1).
        generator: the ``torch.Generator`` (CPU) to draw with.

    Returns:
        A list of ``(inputs, targets)`` pairs.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    batch_size = check_sample_count("batch_size", batch_size)
    steps = check_sample_count("steps", steps)
    if _is_tensor_pair(dataset):
        inputs, targets = dataset
        if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets):
            raise ValueError(
                "dataset: inputs and targets must have the same first dimension, got shapes "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        n = len(inputs)
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = len(dataset)
    else:
        raise TypeError(
            "dataset must be a map-style dataset of (x, y) items or an (inputs, targets) "
            f"tensor pair, got {type(dataset).__name__}"
        )
    if batch_size > n:
        raise ValueError(f"batch_size must be at most len(dataset) = {n}, got {batch_size}")
    batches: list[Batch] = []
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        if _is_tensor_pair(dataset):
            batches.append(
                (dataset[0][idx.to(dataset[0].device)], dataset[1][idx.to(dataset[1].device)])
            )
        else:
            items = [dataset[int(i)] for i in idx]
            x, y = torch.utils.data.default_collate(items)
            batches.append((x, y))
    return batches


# --------------------------------------------------------------------------- copies


def _copy_optimizer(opt: Optimizer, memo: dict[int, Any]) -> Optimizer:
    """A copy of ``opt`` whose parameters are the memo's copies (see the module docstring)."""
    new = type(opt).__new__(type(opt))
    new.__setstate__(copy.deepcopy(opt.__getstate__(), memo))
    for name, value in vars(opt).items():
        if name in vars(new) or (callable(value) and not isinstance(value, Optimizer)):
            continue
        if isinstance(value, Optimizer):
            setattr(new, name, _copy_optimizer(value, memo))
        else:
            setattr(new, name, copy.deepcopy(value, memo))
    return new


def _optimizers(opt: Optimizer) -> list[Optimizer]:
    """``opt`` and the optimizers nested in its attributes (SAM's ``base_optimizer``)."""
    found = [opt]
    for value in vars(opt).values():
        if isinstance(value, Optimizer):
            found += _optimizers(value)
    return found


def _check_owned(optimizer: Optimizer, model: nn.Module) -> None:
    owned = {id(p) for p in model.parameters()}
    for opt in _optimizers(optimizer):
        for i, group in enumerate(opt.param_groups):
            if any(id(p) not in owned for p in group["params"]):
                raise ValueError(
                    f"optimizer: param group {i} holds tensors that are not parameters of "
                    "model; the lookahead copies the model and must step the copies"
                )


def _copies(model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
    memo: dict[int, Any] = {}
    try:
        model_copy = copy.deepcopy(model, memo)
        opt_copy = _copy_optimizer(optimizer, memo)
    except Exception as exc:  # e.g. a non-copyable attribute or hook
        raise TypeError(
            f"lookahead: could not copy the model or the optimizer ({type(exc).__name__}: "
            f"{exc}); they must support copy.deepcopy"
        ) from exc
    _check_owned(opt_copy, model_copy)
    return model_copy, opt_copy


# --------------------------------------------------------------------------- short runs


def _batch_loss(
    model: nn.Module, loss: Callable, batch: Batch, forward_fn: Callable | None
) -> torch.Tensor:
    x, y = batch
    out = model(x) if forward_fn is None else forward_fn(model, x)
    value = loss(out, y)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("loss must return a scalar tensor (use a mean or sum reduction)")
    return value.reshape(())


@torch.no_grad()
def _mean_loss(
    model: nn.Module, loss: Callable, batches: Sequence[Batch], forward_fn: Callable | None
) -> float:
    return sum(float(_batch_loss(model, loss, b, forward_fn)) for b in batches) / len(batches)


def _too_large(value: float, limit: float) -> bool:
    return not math.isfinite(value) or value > limit


def _peak(values: list[float]) -> float:
    return max(v if math.isfinite(v) else math.inf for v in values)


def _short_run(
    model: nn.Module,
    optimizer: Optimizer,
    loss: Callable,
    batches: Sequence[Batch],
    multiple: float,
    limit: float,
    forward_fn: Callable | None,
) -> tuple[float, int | None, float, tuple[float, ...]]:
    """k steps at ``multiple * lr`` on copies: (loss_end, blow-up step or None, peak loss,
    the step losses)."""
    net, opt = _copies(model, optimizer)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * multiple
    seen_values: list[float] = []
    for t, batch in enumerate(batches):
        seen: list[torch.Tensor] = []

        def closure(batch: Batch = batch, seen: list = seen) -> torch.Tensor:
            opt.zero_grad()
            value = _batch_loss(net, loss, batch, forward_fn)
            value.backward()
            seen.append(value.detach())
            return value

        with torch.enable_grad():
            opt.step(closure)
        if not seen:
            raise RuntimeError("optimizer.step(closure) did not call the closure")
        value = float(seen[0])
        seen_values.append(value)
        if _too_large(value, limit):
            return value, t, _peak(seen_values), tuple(seen_values)
    end = _mean_loss(net, loss, batches, forward_fn)
    blown = len(batches) if _too_large(end, limit) else None
    return end, blown, _peak([*seen_values, end]), tuple(seen_values)


def _check_multiples(multiples: object) -> tuple[float, ...]:
    if not isinstance(multiples, (tuple, list)) or not multiples:
        raise ValueError(f"multiples must be a non-empty tuple of numbers > 0, got {multiples!r}")
    vals = sorted(check_positive("multiples", m) for m in multiples)
    if len(set(vals)) != len(vals):
        raise ValueError(f"multiples must be distinct, got {multiples!r}")
    return tuple(vals)


def _check_batches(batches: object) -> list[Batch]:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError("batches must be a non-empty list of (inputs, targets) pairs")
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise ValueError(f"batches[{i}] must be an (inputs, targets) pair")
    return list(batches)


def lookahead(
    model: nn.Module,
    optimizer: Optimizer,
    loss: Callable[[Any, Any], torch.Tensor],
    batches: Sequence[Batch],
    *,
    multiples: Sequence[float] = (1.0, 2.0, 4.0),
    blowup_factor: float = 10.0,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    refine: int = DEFAULT_REFINE,
) -> LookaheadResult:
    """Run ``len(batches)`` real optimizer steps on copies at ``lr`` times each multiple.

    Args:
        model: the module being trained; copied in its current train/eval mode.
        optimizer: its optimizer (any ``torch.optim.Optimizer`` whose ``step`` accepts a
            closure, SAM included); copied with its state; every group's lr is scaled.
        loss: ``loss(outputs, targets) -> scalar tensor`` (e.g. ``nn.CrossEntropyLoss()``).
        batches: the k ``(inputs, targets)`` batches, e.g. from :func:`draw_batches` with
            the probe's own generator.
        multiples: multiples of the current lr to test (> 0, distinct).
        blowup_factor: a short run blew up when a loss exceeds this times ``loss_start``
            or is not finite (> 1).
        forward_fn: ``forward_fn(model, inputs) -> outputs`` instead of ``model(inputs)``.
        refine: at most this many extra short runs to sharpen ``blowup_lr``: halving below
            the smallest multiple when it blew up, then geometric bisection of the bracket
            (no extra run when nothing blew up).

    Returns:
        A frozen :class:`LookaheadResult`.

    Raises:
        TypeError / ValueError: naming the offending argument; ``ValueError`` also when the
        optimizer holds tensors that are not the model's parameters or ``loss_start`` is not
        finite.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not callable(loss):
        raise TypeError(f"loss must be callable (outputs, targets) -> tensor, got {loss!r}")
    mults = _check_multiples(multiples)
    factor = check_positive("blowup_factor", blowup_factor, allow_inf=True)
    if factor <= 1:
        raise ValueError(f"blowup_factor must be > 1, got {factor}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an int >= 0, got {refine!r}")
    batches = _check_batches(batches)
    _check_owned(optimizer, model)
    lr = float(optimizer.param_groups[0]["lr"])

    with preserved_state(model, probe_mode=False):
        start_net, _ = _copies(model, optimizer)
        loss_start = _mean_loss(start_net, loss, batches, forward_fn)
        del start_net
        if not math.isfinite(loss_start):
            raise ValueError(f"lookahead: the loss at the current weights is {loss_start}")
        limit = factor * loss_start

        tested: list[tuple[float, bool]] = []

        def run(c: float) -> tuple[float, int | None, float, tuple[float, ...]]:
            out = _short_run(model, optimizer, loss, batches, c, limit, forward_fn)
            tested.append((c, out[1] is not None))
            return out

        outcomes = [run(c) for c in mults]
        blown = [step is not None for _, step, _, _ in outcomes]
        unstable = [c for c, b in zip(mults, blown, strict=True) if b]
        blowup = min(unstable) if unstable else math.inf
        stable = [c for c, b in zip(mults, blown, strict=True) if not b and c < blowup]
        lo = max(stable) if stable else None
        budget = refine if unstable else 0
        while budget > 0 and lo is None:  # even the smallest multiple blew up: halve
            budget -= 1
            if run(blowup / 2)[1] is None:
                lo = blowup / 2
            else:
                blowup /= 2
        for _ in range(budget if lo is not None else 0):
            mid = math.sqrt(lo * blowup)
            if run(mid)[1] is None:
                lo = mid
            else:
                blowup = mid
    return LookaheadResult(
        lr=lr,
        multiples=mults,
        loss_start=loss_start,
        loss_end=tuple(v for v, _, _, _ in outcomes),
        blew_up=tuple(blown),
        blowup_lr=blowup * lr if unstable and lr > 0 else math.inf,
        steps=len(batches),
        seconds=time.perf_counter() - t0,
        blowup_step=tuple(s for _, s, _, _ in outcomes),
        peak_loss=tuple(p for _, _, p, _ in outcomes),
        step_losses=tuple(v for _, _, _, v in outcomes),
        tested=tuple(tested),
    )
