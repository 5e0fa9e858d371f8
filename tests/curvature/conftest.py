"""Fixtures of the curvature tests (models and references live in curv_cases.py)."""

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
