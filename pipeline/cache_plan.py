"""What a cache build is asked for (`CacheConfig`) and what is known before any model work (`Plan`).

`plan(cfg)` validates the options and computes the hooks, the cache key (`pipeline.cache_key`) and
the store location *without loading the model*, so a repeat request is answered by the existing
store at no model cost.  Only a hub model missing from the local cache, or a default layer whose
model depth cannot be read cheaply, needs the loaded model: then `plan` raises `NeedModel` and the
caller loads it and asks again.  `check_model` checks the options against the model once loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import cache_key, paths
from pipeline.errors import ModelError, UserError
from pipeline.store_layout import join

DEFAULT_MAX_TOKENS = 200_000  # the default build: a few minutes for SmolLM2 to layer 15 on 2 CPU cores
STORE_DTYPES = ("float16", "float32")  # zarr has no bfloat16; it is never stored
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MAX_CHUNK_BYTES = 4 * 2**30  # one hook's chunk; the default (64 x 128 x 576 x fp16) is 9.4 MB

TOKENIZATION = {  # how pipeline.sequences cuts documents; bump "version" if that ever changes
    "scheme": "per-document windows: [BOS]? + next ctx-1 (or ctx) tokens; tails dropped; no packing",
    "add_special_tokens": False,
    "version": 1,
}


@dataclass
class CacheConfig:
    """Everything a build needs.  Fields marked *key* change the stored contents (see cache_key)."""

    model: str = "smollm2-135m"  # key
    layers: tuple[int, ...] | None = None  # key; None and no hooks: one middle layer
    hooks: tuple[str, ...] = ()  # key; explicit TransformerLens hook names, added to the layers
    dataset: str = "shakespeare"  # key
    split: str = "train"  # key
    text_column: str = "text"  # key
    config: str | None = None  # key (dataset configuration name)
    ctx: int = 128  # key
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # key; None: the whole corpus
    prepend_bos: bool = True  # key
    dtype: str = "float32"  # key: compute dtype
    store_dtype: str = "float16"  # key
    batch_size: int = 16
    chunk_seqs: int = 64  # sequences per chunk (the write/resume/verify unit)
    inner_seqs: int | None = None  # None: plain chunks; k: shards of chunk_seqs with inner chunks of k
    cache_dir: str | None = None
    device: str = "auto"
    progress: bool = True


@dataclass
class Plan:
    """What is known before any model work: hooks, key, location."""

    hooks: list[str]
    identity: dict
    fields: dict
    key: str
    location: str | Path


class NeedModel(Exception):
    """plan() needs the loaded model first."""


def plan(cfg: CacheConfig, model=None) -> Plan:
    """Hooks, key and store location for ``cfg``; loads nothing unless the model identity or the
    default layer cannot be known cheaply (a hub model not in the local cache) and no model is given."""
    from pipeline.sources import iter_documents, source_fingerprint

    _validate(cfg)
    identity = cache_key.model_identity(cfg.model, cfg.cache_dir)
    n_layers = model.n_layers if model is not None else cache_key.cheap_n_layers(cfg.model)
    hooks = _hooks(cfg, n_layers)
    if n_layers is not None and any(layer >= n_layers for layer in cfg.layers or ()):
        raise ModelError(
            f"layer {max(cfg.layers)} out of range: {cfg.model} has {n_layers} layers (0-{n_layers - 1})"
        )
    if (identity is None or hooks is None) and model is None:
        raise NeedModel
    if identity is None:
        identity = {"spec": cfg.model, "weights_sha256": model.weights_hash}
    if hooks is None:
        hooks = _hooks(cfg, model.n_layers)
    iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)  # checks the source; reads nothing
    dataset = {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "text_column": cfg.text_column,
        "config": cfg.config,
        "fingerprint": source_fingerprint(cfg.dataset, cfg.split, cfg.text_column, cfg.config),
    }
    fields = cache_key.key_fields(
        model=identity,
        hooks=hooks,
        ctx=cfg.ctx,
        prepend_bos=cfg.prepend_bos,
        dtype=cfg.dtype,
        store_dtype=cfg.store_dtype,
        dataset=dataset,
        max_tokens=cfg.max_tokens,
        tokenization=TOKENIZATION,
    )
    key = cache_key.make_key(fields)
    return Plan(hooks, identity, fields, key, join(paths.cache_home(cfg.cache_dir), key))


def _validate(cfg: CacheConfig) -> None:
    if cfg.store_dtype not in STORE_DTYPES:
        raise UserError(
            f"--store-dtype must be one of {', '.join(STORE_DTYPES)} (zarr cannot store bfloat16), "
            f"got {cfg.store_dtype!r}"
        )
    if cfg.dtype not in COMPUTE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {cfg.dtype!r}")
    for name in ("ctx", "batch_size", "chunk_seqs"):
        if int(getattr(cfg, name)) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.inner_seqs is not None and (cfg.inner_seqs < 1 or cfg.chunk_seqs % cfg.inner_seqs):
        raise UserError(f"inner_seqs must divide chunk_seqs={cfg.chunk_seqs}, got {cfg.inner_seqs}")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.ctx:
        raise UserError(f"max_tokens={cfg.max_tokens} is less than one sequence of ctx={cfg.ctx} tokens")
    if any(layer < 0 for layer in cfg.layers or ()):
        raise ModelError(f"layers must be >= 0, got {list(cfg.layers)}")


def _hooks(cfg: CacheConfig, n_layers: int | None) -> list[str] | None:
    """Hook names in canonical order (by block, then name); None if the default layer needs n_layers."""
    layers = list(cfg.layers or ())
    if not layers and not cfg.hooks:
        if n_layers is None:
            return None
        layers = cache_key.default_layers(n_layers)
    names = {f"blocks.{layer}.hook_resid_post" for layer in layers} | set(cfg.hooks)

    def order(h: str):
        parts = h.split(".")
        return (int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1, h)

    return sorted(names, key=order)


def check_model(cfg: CacheConfig, model, hooks: list[str]) -> None:
    """Refuse a model that cannot serve ``cfg``: an unknown hook, a ctx beyond its context, or
    chunks too large to hold in memory."""
    model.resolve_hooks(hooks=hooks)  # raises ModelError for a layer out of range or an unknown hook
    if cfg.ctx > model.n_ctx:
        raise ModelError(f"ctx {cfg.ctx} exceeds {model.name}'s context length n_ctx={model.n_ctx}")
    chunk_bytes = cfg.chunk_seqs * cfg.ctx * model.d_model * np.dtype(cfg.store_dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:  # a chunk is held in memory (several, queued) while written
        raise UserError(
            f"--chunk-seqs {cfg.chunk_seqs} makes chunks of {chunk_bytes / 2**30:.1f} GiB per hook "
            f"(limit {MAX_CHUNK_BYTES // 2**30} GiB); use at most "
            f"{MAX_CHUNK_BYTES // (cfg.ctx * model.d_model * np.dtype(cfg.store_dtype).itemsize)}"
        )
