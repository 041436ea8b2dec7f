"""The `tiny` model spec: a random-init TransformerLens-native model for tests.

`"tiny"` is 2 layers, d_model 64, n_ctx 128, seed 0 (`TINY_DEFAULTS`), with SmolLM2's real
tokenizer; `"tiny:n_layers=3,d_model=32,seed=1"` overrides any `TransformerBridgeConfig` field.
When only d_model or n_heads is overridden, d_head = d_model // n_heads and d_mlp = 4 d_model
follow, so the model stays consistent.
"""

from __future__ import annotations

import inspect
from typing import Any

from pipeline.errors import ModelError

TINY_DEFAULTS: dict[str, Any] = dict(
    d_model=64,
    d_head=16,
    n_heads=4,
    n_layers=2,
    n_ctx=128,
    d_mlp=256,
    act_fn="gelu",
    normalization_type="LN",
    seed=0,
    default_prepend_bos=False,
)


def boot_tiny(overrides: dict[str, Any], tokenizer):
    """The float32 CPU `TransformerBridge` for `overrides` (from `parse_tiny_overrides`); an unknown
    setting raises ModelError, a value of the wrong type or size whatever the bridge raises."""
    import torch
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    config = TransformerBridgeConfig(d_vocab=len(tokenizer), **tiny_settings(overrides))
    return TransformerBridge.boot_native(config, tokenizer=tokenizer, device="cpu", dtype=torch.float32)


def tiny_name(overrides: dict[str, Any]) -> str:
    """`"tiny"`, then the settings that differ from the defaults: `"tiny:n_layers=3,seed=1"`."""
    changed = {k: v for k, v in sorted(overrides.items()) if TINY_DEFAULTS.get(k) != v}
    return "tiny" + (":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


def parse_tiny_overrides(spec: str) -> dict[str, Any]:
    """`"tiny:n_layers=3,seed=1"` -> `{"n_layers": 3, "seed": 1}` (cheap: no validation, no imports)."""
    _, _, body = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"bad tiny override {item!r} in {spec!r}; write tiny:key=value,key=value")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def tiny_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """`TINY_DEFAULTS` with `overrides` applied, checked against `TransformerBridgeConfig`."""
    from transformer_lens.config import TransformerBridgeConfig

    allowed = set(inspect.signature(TransformerBridgeConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(overrides) - allowed - {"d_vocab"})
    if unknown or "d_vocab" in overrides:
        bad = ", ".join(unknown or ["d_vocab (fixed by the tokenizer)"])
        raise ModelError(f"unknown tiny setting {bad}; e.g. tiny:n_layers=3,d_model=32,seed=1")
    settings = {**TINY_DEFAULTS, **overrides}
    for k in ("d_model", "d_head", "n_heads", "n_layers", "n_ctx", "d_mlp"):
        v = settings[k]
        if k in overrides and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ModelError(f"tiny setting {k} must be a positive integer, got {v!r}")
    # Keep the model consistent when only some sizes are overridden.
    if "d_head" not in overrides:
        settings["d_head"] = max(1, settings["d_model"] // settings["n_heads"])
    if "d_mlp" not in overrides:
        settings["d_mlp"] = 4 * settings["d_model"]
    return settings


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
