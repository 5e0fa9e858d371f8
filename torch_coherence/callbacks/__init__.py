"""Training-framework integrations.

:class:`CoherenceCallback` (PyTorch Lightning) is imported on first access, so that the
plain-loop :class:`~torch_coherence.CoherenceMonitor` never imports Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CoherenceCallback"]


def __getattr__(name: str) -> Any:
    if name == "CoherenceCallback":
        from .lightning import CoherenceCallback

        return CoherenceCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
