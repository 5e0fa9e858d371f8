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
