"""Old import path of :class:`~torch_coherence.integrations.lightning.CoherenceCallback`."""

from ..integrations.lightning import LOSS_ATTRIBUTES, CoherenceCallback

__all__ = ["LOSS_ATTRIBUTES", "CoherenceCallback"]
