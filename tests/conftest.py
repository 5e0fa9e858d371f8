"""Shared fixtures. Reference implementations live in ``tests/references.py``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
