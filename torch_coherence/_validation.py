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
    "check_batch_size",
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

    ``sigma >= 1`` holds by definition (MATH.md §2): lambda_1(S) >= max_i S_ii >=
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
