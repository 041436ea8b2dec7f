"""What a store records about its build: the root attributes written when the store is created."""

from __future__ import annotations

import importlib.metadata
import sys

from pipeline.store_layout import FORMAT_TAG, FORMAT_VERSION


def root_attrs(cfg, model, p) -> dict:
    """The store's root attributes for a build of ``cfg`` (`CacheConfig`) by ``model`` (`LoadedModel`)
    under plan ``p`` (`Plan`): format, key, model, hooks, tokenizer, software versions."""
    tok = model.tokenizer
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "key": p.key,
        "key_fields": p.fields,
        "model": {
            "name": model.name,
            "spec": cfg.model,
            "weights_hash": model.weights_hash,
            "identity": p.identity,
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "n_ctx": model.n_ctx,
        },
        "hooks": p.hooks,
        "layers": [model.layer_of(h) for h in p.hooks],
        "ctx": cfg.ctx,
        "d_model": model.d_model,
        "prepend_bos": cfg.prepend_bos,
        "bos_token_id": model.bos_token_id,
        "dtype": cfg.dtype,
        "store_dtype": cfg.store_dtype,
        "dataset": p.fields["dataset"],
        "max_tokens": cfg.max_tokens,
        "tokenizer": {
            "name": getattr(tok, "name_or_path", None),
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        "versions": versions(),
        "device": str(model.device),
        "batch_size": cfg.batch_size,
    }


def versions() -> dict:
    """Python's and the relevant packages' versions (None for one not installed)."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformer-lens", "transformers", "zarr", "numpy", "tsae"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
