"""Architecture name -> SAE class, so a saved folder can be loaded without knowing its class."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tsae.models.base import CONFIG_FILE, SAE

_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` loadable by its `architecture` name."""
    _REGISTRY[cls.architecture] = cls
    return cls


def sae_class(architecture: str) -> type[SAE]:
    _import_builtin_models()
    if architecture not in _REGISTRY:
        raise ValueError(f"unknown SAE architecture {architecture!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[architecture]


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load any SAE saved by tsae (cfg.json + sae_weights.safetensors)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}")
    cfg = json.loads(cfg_path.read_text())
    from tsae.models.saelens_format import load_saelens, looks_like_saelens

    if looks_like_saelens(cfg):  # a folder written by SAELens itself, e.g. a published SAE
        return load_saelens(folder, device=device)
    return sae_class(cfg.get("architecture", "")).load(folder, device=device)


def _import_builtin_models() -> None:
    # Importing the modules runs their @register decorators.
    import tsae.models  # noqa: F401
