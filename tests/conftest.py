"""Shared fixtures (builders live in tests/tiny.py)."""

from __future__ import annotations

import pytest

from cos_model import CosConfig, CosForConditionalGeneration
from tests.tiny import tiny_config, tiny_model


@pytest.fixture
def config() -> CosConfig:
    return tiny_config()


@pytest.fixture
def model(config: CosConfig) -> CosForConditionalGeneration:
    return tiny_model(config)
