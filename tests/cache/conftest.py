"""Fixtures shared by the cache tests: a small tiny-model build, and a store's arrays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache_runner import CacheConfig
from pipeline.store import ActivationStore

# 44 sequences of 32 tokens in 6 chunks of 8 (the last holds 4), forwards in batches of 4
SMALL_BUILD = dict(model="tiny", ctx=32, max_tokens=32 * 44, chunk_seqs=8, batch_size=4, progress=False)


@pytest.fixture
def cfg_for():
    """`cfg_for(cache_dir, **overrides)`: the `CacheConfig` of `SMALL_BUILD` in `cache_dir` (a path
    or URL), with any field overridden."""

    def make(cache_dir, **overrides) -> CacheConfig:
        return CacheConfig(**{**SMALL_BUILD, "cache_dir": str(cache_dir), **overrides})

    return make


@pytest.fixture
def store_arrays():
    """`store_arrays(store)`: every array of an `ActivationStore` by name (`acts/<hook>`, `tokens`,
    `doc_id`, `doc_offset`), read whole."""

    def arrays(store: ActivationStore) -> dict[str, np.ndarray]:
        out = {f"acts/{h}": np.asarray(store.activations(h)[:]) for h in store.hooks}
        out.update(tokens=store.tokens[:], doc_id=store.doc_id[:], doc_offset=store.doc_offset[:])
        return out

    return arrays
