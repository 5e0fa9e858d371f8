"""Fixtures of the integration tests; models and data are in ``helpers.py``."""

from __future__ import annotations

import pytest


@pytest.fixture
def quiet_lightning(monkeypatch):
    """Silence Lightning's informational output."""
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


@pytest.fixture(autouse=True)
def _engine_until_landed(monkeypatch):
    """TEMPORARY: use a stand-in engine while torch_coherence.curvature is missing."""
    try:
        from torch_coherence.curvature import measure_curvature  # noqa: F401
    except ImportError:
        from callbacks.helpers import fake_measure_curvature

        monkeypatch.setattr("torch_coherence.probe._default_engine", fake_measure_curvature)
    yield
