"""Where the probe meets training code: Lightning, the Hugging Face Trainer, plain loops.

* :class:`CoherenceCallback` (:mod:`.lightning`): ``pytorch_lightning`` / ``lightning.pytorch``;
* :class:`CoherenceTrainerCallback` (:mod:`.transformers`): ``transformers.Trainer``
  (``pip install "torch-coherence[hf]"``);
* :class:`CoherenceMonitor` (:mod:`.monitor`): a plain PyTorch loop;
* :mod:`.tensorboard`: the TensorBoard output all three share;
* :mod:`.distributed`: the probe under FSDP2 (``fully_shard``) and DDP, the Gram split over
  the ranks and summed by one all-reduce.

The two callbacks are imported on first access, so that the monitor never imports
Lightning or transformers.
"""

from __future__ import annotations

from typing import Any

from .monitor import CoherenceMonitor

__all__ = ["CoherenceCallback", "CoherenceMonitor", "CoherenceTrainerCallback"]

_LAZY = {"CoherenceCallback": ".lightning", "CoherenceTrainerCallback": ".transformers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
