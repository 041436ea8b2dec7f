"""Where tsae keeps its caches.

The cache home is resolved in this order:

1. an explicit argument (the CLIs' `--cache-dir`),
2. the `TSAE_CACHE_DIR` environment variable,
3. `<repo>/cache` when running from a source checkout, else `~/.cache/tsae`.

Activation stores may live under an fsspec URL (`s3://bucket/tsae`, `gs://...`); converted model
folders are always local, because transformers loads them from disk. When the cache home is a URL,
models go under the default local home instead.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TSAE_CACHE_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def is_url(location: str | os.PathLike) -> bool:
    """True for a remote fsspec URL such as `s3://bucket/x`; `file://` counts as local."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def default_cache_home() -> Path:
    """`<repo>/cache` in a source checkout, else `~/.cache/tsae`."""
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / "cache"
    return Path.home() / ".cache" / "tsae"


def cache_home(cache_dir: str | os.PathLike | None = None) -> str:
    """The cache home as a string: an absolute local path or a remote URL."""
    chosen = cache_dir if cache_dir not in (None, "") else os.environ.get(ENV_VAR) or None
    if chosen is None:
        return str(default_cache_home())
    text = os.fspath(chosen)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_url(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def local_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache home>/<name>` on local disk (the default home when the stores live at a remote URL)."""
    home = cache_home(cache_dir)
    base = default_cache_home() if is_url(home) else Path(home)
    return base / name


def models_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder holding converted models: `<cache home>/models`."""
    return local_dir("models", cache_dir)


def saes_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder holding trained SAEs reused across experiment runs: `<cache home>/saes`."""
    return local_dir("saes", cache_dir)
