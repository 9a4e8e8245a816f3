"""Shared fixtures for the winoq tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """Seed torch's global generator for tests that draw from it directly."""
    torch.manual_seed(0)
    return 0
