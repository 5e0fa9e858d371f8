"""Old import path of :class:`~torch_coherence.integrations.monitor.CoherenceMonitor`."""

from .integrations.monitor import CoherenceMonitor

__all__ = ["CoherenceMonitor"]
