"""Root fixtures: the tiny and real models, and a throw-away cache home.

Tests run offline. Converted model folders are shared across test sessions (the default cache home,
or `TSAE_TEST_CACHE_DIR`), so SmolLM2's one-time GGUF conversion is paid once per machine; stores go
to a fresh temporary cache home per test.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

from pipeline import paths  # noqa: E402


def pytest_collection_modifyitems(items):
    """A test that uses the real model is a `real_model` test, marked or not."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def models_home() -> str:
    """The cache home whose `models/` folder holds the converted models used by tests."""
    return paths.cache_home(os.environ.get("TSAE_TEST_CACHE_DIR"))


@pytest.fixture(scope="session")
def tiny_model(models_home):
    """The random-init 2-layer `tiny` model (d_model 64, n_ctx 128) with SmolLM2's tokenizer."""
    from pipeline.models import load_model

    return load_model("tiny", cache_home=models_home)


@pytest.fixture(scope="session")
def smollm2(models_home):
    """The embedded SmolLM2-135M (float32, CPU); built only when a test asks for it."""
    from pipeline.models import load_model

    return load_model("smollm2-135m", device="cpu", cache_home=models_home)


@pytest.fixture
def tmp_cache_dir(tmp_path, models_home, monkeypatch):
    """An empty cache home (also set as TSAE_CACHE_DIR) whose `models/` links to the shared models."""
    home = tmp_path / "cache"
    home.mkdir()
    shared = paths.models_dir(models_home)
    shared.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv(paths.ENV_VAR, str(home))
    return home
