"""Probing fixtures: SmolLM2's real tokenizer (every generator filters its vocabulary by it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    return tiny_model.tokenizer
