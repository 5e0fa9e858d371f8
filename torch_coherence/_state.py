"""Exact save and restore of everything a curvature probe could disturb.

A probe runs forward and backward passes, draws random numbers (Monte-Carlo labels, Lanczos
start vectors) and switches the model to evaluation mode. Training must not notice any of it
("never harm training"): :func:`preserved_state` snapshots the model and the global
random number generators on entry and puts every bit back on exit, also when the probe raises.

Restoration writes *into the original tensors* (``copy_``) instead of rebinding them, so the
references an optimizer, a DDP bucket view (``gradient_as_bucket_view``) or a user holds stay
valid. A tensor whose bits did not change is not written at all, which keeps its autograd
version counter unchanged: a graph built before the probe can still be back-propagated.

What is *not* covered: optimizer state (the probe never touches the optimizer), MPS/XPU
generators, and a CUDA generator that is first initialised *inside* the context (its state
before initialisation does not exist yet; a model on a CUDA device has initialised it).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["preserved_rng", "preserved_state"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``True`` when ``a`` and ``b`` hold the same bits (``-0.0 != 0.0``, ``NaN == NaN``)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_meta:  # no data to compare or restore
        return True
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        as_int = _INT_OF_SIZE[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return bool(torch.equal(a, b))


def _restore_values(target: torch.Tensor, saved: torch.Tensor) -> None:
    """Write ``saved`` into ``target`` in place, skipping the write when nothing changed."""
    if _bit_equal(target, saved):
        return
    with torch.no_grad():
        if target.shape == saved.shape and target.dtype == saved.dtype:
            target.copy_(saved)
        else:  # a grad whose shape or dtype changed: in-place restoration is impossible
            target.data = saved.clone()


@dataclass
class _TensorRecord:
    """One parameter or buffer: the object, a copy of its values and (parameters) its grad."""

    tensor: torch.Tensor
    storage: torch.Tensor  # an alias of the original storage, in case ``.data`` is rebound
    values: torch.Tensor
    requires_grad: bool
    grad: torch.Tensor | None = None
    grad_values: torch.Tensor | None = None


@dataclass
class _Snapshot:
    slots: list[tuple[dict[str, Any], dict[str, Any]]]
    records: list[_TensorRecord]
    training: list[tuple[nn.Module, bool]]
    grad_enabled: bool
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: Any
    python_rng: Any


def _take_snapshot(model: nn.Module) -> _Snapshot:
    modules = list(model.modules())
    # the registration dicts themselves: restores parameters/buffers that were rebound,
    # added or deleted (e.g. by a parametrization that failed half-way)
    slots = [(m._parameters, dict(m._parameters)) for m in modules]
    slots += [(m._buffers, dict(m._buffers)) for m in modules]
    records: list[_TensorRecord] = []
    seen: set[int] = set()
    for _, original in slots:
        for t in original.values():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            rec = _TensorRecord(t, t.detach(), t.detach().clone(), t.requires_grad)
            if isinstance(t, nn.Parameter) and t.grad is not None:
                rec.grad = t.grad
                rec.grad_values = t.grad.detach().clone()
            records.append(rec)
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return _Snapshot(
        slots=slots,
        records=records,
        training=[(m, m.training) for m in modules],
        grad_enabled=torch.is_grad_enabled(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=cuda_rng,
        numpy_rng=np.random.get_state(),  # noqa: NPY002 (the global state is the point)
        python_rng=random.getstate(),
    )


def _restore(snap: _Snapshot) -> list[str]:
    """Put everything back; returns what could not be restored (empty: everything was).

    Modes, grad mode and RNG states come first (they cannot fail); every tensor is restored
    on its own, so one that fails (e.g. a device without kernels) does not stop the others.
    """
    for module, flag in snap.training:
        module.training = flag
    torch.set_grad_enabled(snap.grad_enabled)
    failures: list[str] = []
    for step in (_restore_rng, _restore_slots):
        try:
            step(snap)
        except Exception as exc:  # restoration goes on; reported below
            failures.append(f"{step.__name__[9:]}: {type(exc).__name__}: {exc}")
    for rec in snap.records:
        try:
            _restore_record(rec)
        except Exception as exc:  # the other tensors are still restored
            failures.append(
                f"tensor of shape {tuple(rec.tensor.shape)}: {type(exc).__name__}: {exc}"
            )
    return failures


def _restore_rng(snap: _Snapshot) -> None:
    torch.set_rng_state(snap.torch_rng)
    if snap.cuda_rng is not None:
        torch.cuda.set_rng_state_all(snap.cuda_rng)
    np.random.set_state(snap.numpy_rng)  # noqa: NPY002
    random.setstate(snap.python_rng)


def _restore_slots(snap: _Snapshot) -> None:
    for live, original in snap.slots:
        for name in [k for k in live if k not in original]:
            del live[name]
        for name, t in original.items():
            if name not in live or live[name] is not t:
                live[name] = t


def _restore_record(rec: _TensorRecord) -> None:
    t = rec.tensor
    if t.data_ptr() != rec.storage.data_ptr() or t.shape != rec.storage.shape:
        t.data = rec.storage  # ``.data`` was rebound: back to the original storage
    _restore_values(t, rec.values)
    if t.is_leaf and t.requires_grad != rec.requires_grad:
        t.requires_grad_(rec.requires_grad)
    if not isinstance(t, nn.Parameter):
        return
    if rec.grad is None:
        t.grad = None
        return
    if t.grad is not rec.grad:
        t.grad = rec.grad
    _restore_values(rec.grad, rec.grad_values)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block with the global generators (torch CPU, CUDA when initialised, numpy's,
    Python's ``random``) restored afterwards, also when it raises: for work outside a model,
    such as indexing a dataset whose items draw a random augmentation."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    snap = _Snapshot(
        slots=[],
        records=[],
        training=[],
        grad_enabled=torch.is_grad_enabled(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=cuda_rng,
        numpy_rng=np.random.get_state(),  # noqa: NPY002
        python_rng=random.getstate(),
    )
    try:
        yield
    finally:
        _restore_rng(snap)


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, probe_mode: bool = True) -> Iterator[nn.Module]:
    """Run a block with the model's state and the global RNGs restored exactly afterwards.

    On entry it records, for ``model`` and all its submodules: parameter and buffer values
    (e.g. BatchNorm ``running_mean``, ``running_var``, ``num_batches_tracked``), each
    parameter's ``.grad`` (``None`` or a tensor, values copied) and ``requires_grad`` flag,
    every ``training`` flag, the grad mode, and the states of the torch CPU generator, of all
    CUDA generators (when CUDA is initialised), of numpy's global generator and of Python's
    ``random``. On exit, normal or by an exception, all of it is restored bit for bit, writing
    into the original tensor objects so optimizer references stay valid.

    With ``probe_mode=True`` the model is put in ``eval()`` mode inside the block: BatchNorm
    uses its running statistics and dropout is off. Per-sample curvature is undefined under
    batch statistics, because then every sample's output depends on the whole batch.

    Args:
        model: the module to protect.
        probe_mode: switch ``model`` to evaluation mode inside the block.

    Yields:
        ``model`` itself.

    Example:
        >>> with preserved_state(model):
        ...     report = measure_curvature(model, x, y, nn.CrossEntropyLoss())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    snap = _take_snapshot(model)
    try:
        if probe_mode:
            model.eval()
        yield model
    except BaseException as exc:
        failures = _restore(snap)
        if failures:  # the block's own error stays the one raised
            exc.add_note("preserved_state could not restore: " + "; ".join(failures))
        raise
    failures = _restore(snap)
    if failures:
        raise RuntimeError("preserved_state could not restore: " + "; ".join(failures))
