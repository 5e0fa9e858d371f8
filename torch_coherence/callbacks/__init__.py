"""Training-framework callbacks; old import path of :mod:`torch_coherence.integrations`.

:class:`CoherenceCallback` (PyTorch Lightning) and :class:`CoherenceTrainerCallback`
(Hugging Face ``transformers.Trainer``) are imported on first access, so that importing
this package pulls in neither framework.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CoherenceCallback", "CoherenceTrainerCallback"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .. import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
