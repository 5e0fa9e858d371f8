"""Argument checks shared by the numerical modules.

Every check raises ``ValueError`` or ``TypeError`` with a message that names the argument,
what was expected and what was received, so that a bad call fails at the boundary rather
than deep inside a linear-algebra routine.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "NonFiniteError",
    "check_batch_size",
    "check_probe_inputs",
    "check_probe_model",
    "check_targets",
    "embedding_id_guard",
    "forward_error",
    "check_finite_tensor",
    "check_momentum",
    "check_nonnegative",
    "check_positive",
    "check_sample_count",
    "check_sigma",
    "default_tol",
]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float after checking ``0 < value`` (and finiteness)."""
    v = _real(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float after checking ``0 <= value < inf``."""
    v = _real(name, value)
    if not (0 <= v < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return v


def check_sample_count(name: str, value: object) -> int:
    """Return ``value`` as an int after checking it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, Real) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def check_batch_size(value: object, n: int, name: str = "batch_size") -> float:
    """Return the batch size as a float after checking ``1 <= B <= n``.

    Non-integer batch sizes are accepted because critical batch sizes are real numbers and
    the formulas are continuous in B.
    """
    b = _real(name, value)
    if not (1 <= b <= n):
        raise ValueError(f"{name} must lie in [1, n] = [1, {n}], got {b}")
    return b


def check_momentum(value: object, name: str = "momentum") -> float:
    """Return the heavy-ball momentum after checking ``0 <= beta < 1``."""
    b = _real(name, value)
    if not (0 <= b < 1):
        raise ValueError(f"{name} must lie in [0, 1), got {b}")
    return b


def check_sigma(value: object, name: str = "sigma", *, tol: float = 1e-9) -> float:
    """Return the coherence measure after checking ``sigma >= 1``.

    ``sigma >= 1`` holds by definition (docs/theory.md §2): lambda_1(S) >= max_i S_ii >=
    max_i lambda_1(H_i). A smaller value means the caller mixed up quantities.
    """
    s = _real(name, value)
    if math.isinf(s) or s < 1 - tol:
        raise ValueError(
            f"{name} must be a finite number >= 1 (the coherence measure is at least 1 by "
            f"definition), got {s}"
        )
    return max(s, 1.0)


def check_finite_tensor(name: str, tensor: object) -> torch.Tensor:
    """Check that ``tensor`` is a floating-point tensor without NaN or inf entries."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"{name} must have a floating-point dtype, got {tensor.dtype}")
    if tensor.is_complex():
        raise TypeError(f"{name} must be real, got dtype {tensor.dtype}")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite entries")
    return tensor


def default_tol(dtype: torch.dtype) -> float:
    """Relative tolerance for symmetry / PSD checks of data given in ``dtype``.

    100 machine epsilons of the *input* dtype: ~2e-14 for float64, ~1e-5 for float32.
    """
    return 100.0 * torch.finfo(dtype).eps


# --- probe inputs of measure_curvature -------------------------------------------------------


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN or infinite value in the model's weights, the probe inputs or what they produce."""


def _samples(bad: torch.Tensor) -> list[int]:
    """Indices of the probe samples (axis 0) with any True entry, at most 20."""
    return bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()[:20]


def check_probe_model(model: torch.nn.Module) -> None:
    """The model has real data (not the meta device) and finite parameters and buffers."""
    named = [("parameter", k, t) for k, t in model.named_parameters()]
    named += [("buffer", k, t) for k, t in model.named_buffers()]
    meta = [k for _, k, t in named if t.is_meta]
    if meta:
        raise ValueError(
            f"model: {len(meta)} parameters/buffers are on the meta device (no values), e.g. "
            f"{meta[0]!r}; materialise the model first (model.to_empty(device=...) and "
            "load_state_dict, or build it outside torch.device('meta'))"
        )
    for kind, k, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            n = int((~torch.isfinite(t.detach())).sum())
            raise NonFiniteError(
                f"model: {kind} {k!r} has {n} NaN or infinite entries (of {t.numel()}); every "
                "probe sample's curvature would be undefined"
            )


def check_probe_inputs(inputs: object) -> None:
    """Floating-point probe input tensors are finite; names the samples that are not."""
    leaves = torch.utils._pytree.tree_flatten(inputs)[0]
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                raise NonFiniteError(
                    f"inputs: NaN or infinite values at probe samples {_samples(bad)}; drop or "
                    "clean these samples"
                )


def forward_error(exc: Exception, inputs: object, model: torch.nn.Module) -> Exception:
    """A clearer error for a failed probe forward pass when the dtypes do not match."""
    pdt = {p.dtype for p in model.parameters() if p.is_floating_point()}
    leaves = torch.utils._pytree.tree_flatten(inputs)[0]
    idt = {t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(pdt) == 1 and idt and idt != pdt:
        (want,) = pdt
        got = ", ".join(sorted(str(d) for d in idt))
        return TypeError(
            f"inputs: floating-point dtype {got} but the model's parameters are {want}; convert "
            f"the inputs (inputs.to({want})) or the model; the forward pass failed with: {exc}"
        )
    return exc


def _class_axis(outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """The class axis of ``outputs`` for class-index ``targets`` (None: shapes do not fit)."""
    if outputs.dim() >= 2 and targets.shape == outputs.shape[:1] + outputs.shape[2:]:
        return 1
    if outputs.dim() >= 3 and targets.shape == outputs.shape[:-1]:
        return outputs.dim() - 1
    return None


def check_targets(loss: object, outputs: torch.Tensor, targets: object) -> None:
    """Targets fit the loss and the outputs (before any curvature is computed).

    Cross-entropy / NLL: class indices (an integer tensor with the outputs' shape less the
    class axis) in [0, C) or ``ignore_index``, or (cross-entropy) probabilities of the outputs'
    shape; class weights with C entries. MSE / BCE: exactly the outputs' shape (PyTorch would
    broadcast a (m, 1) target against (m,) outputs into an (m, m) loss).
    """
    nn = torch.nn
    if not isinstance(targets, torch.Tensor):
        if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.BCEWithLogitsLoss)):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
        return
    out_shape = tuple(outputs.shape)
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        name = type(loss).__name__
        if targets.is_floating_point() or targets.is_complex():
            if isinstance(loss, nn.CrossEntropyLoss) and tuple(targets.shape) == out_shape:
                return  # class probabilities
            raise TypeError(
                f"targets: {name} needs class indices (an integer tensor of shape "
                f"{out_shape[:1] + out_shape[2:]})"
                + (f" or class probabilities of shape {out_shape}" if name[0] == "C" else "")
                + f", got {targets.dtype} of shape {tuple(targets.shape)}; use targets.long()"
            )
        axis = _class_axis(outputs, targets)
        if axis is None:
            raise ValueError(
                f"targets: shape {tuple(targets.shape)} does not fit outputs of shape {out_shape} "
                f"for {name} (expected {out_shape[:1] + out_shape[2:]})"
            )
        C = out_shape[axis]
        if outputs.dim() >= 3 and targets.shape == outputs.shape[:-1]:
            C = max(C, out_shape[1])  # (m, V, T) and (m, T, V) both fit: the larger bound
        bad = ((targets < 0) | (targets >= C)) & (targets != loss.ignore_index)
        if bool(bad.any()):
            vals = sorted(set(targets[bad].flatten().tolist()))[:5]
            raise ValueError(
                f"targets: class indices must lie in [0, {C - 1}] (the outputs have {C} classes)"
                f" or equal ignore_index={loss.ignore_index}; got {vals} at probe samples "
                f"{_samples(bad)}"
            )
        w = loss.weight
        if w is not None and w.numel() != C:
            raise ValueError(
                f"loss: weight has {w.numel()} entries but the outputs have {C} classes"
            )
        return
    if isinstance(loss, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        if tuple(targets.shape) != out_shape:
            raise ValueError(
                f"targets: shape {tuple(targets.shape)} differs from the outputs' shape "
                f"{out_shape}; {type(loss).__name__} would broadcast them (use targets.view_as("
                "outputs) if the values line up)"
            )
        if not targets.is_floating_point():
            raise TypeError(
                f"targets: {type(loss).__name__} needs floating-point targets, got {targets.dtype}"
            )


def embedding_id_guard(model: torch.nn.Module, m: int):
    """Forward pre-hooks that reject out-of-range ids before any ``nn.Embedding`` looks them up.

    Returns the hook handles (call ``remove()`` on each).
    """
    names = {mod: k for k, mod in model.named_modules()}

    def pre(mod: torch.nn.Embedding, args: tuple) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            return
        n = mod.num_embeddings
        bad = (ids < 0) | (ids >= n)
        if bool(bad.any()):
            where = (
                f" at probe samples {_samples(bad)}" if ids.dim() > 0 and ids.shape[0] == m else ""
            )
            vals = sorted(set(ids[bad].flatten().tolist()))[:5]
            raise ValueError(
                f"inputs: ids reaching embedding {names.get(mod, '?')!r} must lie in "
                f"[0, {n - 1}] (num_embeddings={n}); got {vals}{where}"
            )

    return [
        mod.register_forward_pre_hook(pre)
        for mod in model.modules()
        if isinstance(mod, torch.nn.Embedding)
    ]
