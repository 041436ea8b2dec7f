"""The activation store: build with the tiny model, read back, key, cache hits, layouts, URLs, opening."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from pipeline import models
from pipeline.cache_runner import build_cache, plan
from pipeline.errors import StoreError
from pipeline.sequences import iter_sequences
from pipeline.sources import iter_documents
from pipeline.store import ActivationStore, list_stores, remove

HOOK = "blocks.1.hook_resid_post"


def direct(model, tokens: np.ndarray, hooks: list[str]) -> dict[str, np.ndarray]:
    out = model.run_to_hooks(torch.from_numpy(tokens), hooks)
    return {h: v.float().numpy() for h, v in out.items()}


def test_build_equals_direct_forward(tiny_model, tmp_cache_dir, cfg_for):
    r = build_cache(cfg_for(tmp_cache_dir, store_dtype="float32"), model=tiny_model)
    assert not r.hit and r.n_seq == 44 and r.n_tokens == 44 * 32
    s = ActivationStore.open(r.key, model="tiny", hook=HOOK)
    assert s.hooks == [HOOK] and s.attrs["status"] == "complete" and s.activations(HOOK).dtype == np.float32
    assert s.activations(HOOK).chunks[0] == 8 and len(s.manifest().checksums["tokens"]) == 6  # 44 = 5x8 + 4

    # tokens, doc ids and offsets: exactly the deterministic enumeration of the corpus
    want = list(
        iter_sequences(iter_documents("shakespeare", "train"), tiny_model.tokenizer, 32, True, 32 * 44)
    )
    acts, tokens = s.read(np.arange(s.n_seq), HOOK)
    np.testing.assert_array_equal(tokens, np.stack([w.tokens for w in want]))
    np.testing.assert_array_equal(s.doc_id[:], [w.doc_id for w in want])
    np.testing.assert_array_equal(s.doc_offset[:], [w.doc_offset for w in want])
    assert (tokens[:, 0] == tiny_model.bos_token_id).all()
    first_play = next(iter_documents("shakespeare", "train")).text
    assert tiny_model.tokenizer.decode(tokens[0, 1:]) in first_play

    # activations: a direct run_to_hooks on the same tokens, one batch
    np.testing.assert_allclose(acts, direct(tiny_model, tokens, [HOOK])[HOOK], rtol=1e-5, atol=1e-5)

    # stats recorded while writing agree with the data
    st = s.stats(HOOK)
    flat = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
    assert st["count"] == len(flat)
    np.testing.assert_allclose(st["mean"], flat.mean(0), rtol=1e-6, atol=1e-9)
    assert st["mean_norm"] == pytest.approx(np.linalg.norm(flat, axis=1).mean(), rel=1e-6)
    assert s.attrs["sequences"]["n_sequences"] == 44 and s.attrs["sequences"]["hit_max_tokens"]
    assert s.attrs["model"]["weights_hash"] == tiny_model.weights_hash


def test_multi_layer_float16_window_and_iter(tiny_model, tmp_cache_dir, cfg_for):
    hooks = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", HOOK]
    r = build_cache(cfg_for(tmp_cache_dir, layers=(0, 1), hooks=("blocks.0.hook_mlp_out",)), model=tiny_model)
    s = ActivationStore.open(r.key)
    assert s.hooks == sorted(hooks) and r.key.startswith("tiny_H0.mlpout-0.residpost-1.residpost_ctx32_")
    assert all(s.activations(h).dtype == np.float16 for h in hooks)
    _, tokens = s.read(np.arange(s.n_seq), HOOK)
    ref = direct(tiny_model, tokens, hooks)
    for h in hooks:
        got, _ = s.read(np.arange(s.n_seq), h)
        np.testing.assert_allclose(got, ref[h].astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)

    # random reads in any order, a window, and windows from iter_windows all agree with read()
    idx = [17, 3, 40, 3]
    a, t = s.read(idx, HOOK)
    full, full_t = s.read(np.arange(s.n_seq), HOOK)
    np.testing.assert_array_equal(a, full[idx]) and np.testing.assert_array_equal(t, full_t[idx])
    wa, wt = s.window(9, 5, 7, HOOK)
    np.testing.assert_array_equal(wa, full[9, 5:12]) and np.testing.assert_array_equal(wt, full_t[9, 5:12])
    n = 0
    for batch in s.iter_windows(HOOK, window=8, batch_size=16, seed=1):
        for acts, toks, q, st in zip(batch.acts, batch.tokens, batch.seq, batch.start, strict=True):
            np.testing.assert_array_equal(acts.numpy(), full[q, st : st + 8])
            np.testing.assert_array_equal(toks.numpy(), full_t[q, st : st + 8])
            n += 1
    assert n == s.n_seq * 32 // 8

    train, val = s.split(0.2)
    assert len(train) + len(val) == s.n_seq and not set(s.doc_id[:][train]) & set(s.doc_id[:][val])


def test_cache_hit_does_no_model_work(tiny_model, tmp_cache_dir, monkeypatch, cfg_for):
    cfg = cfg_for(tmp_cache_dir, max_tokens=32 * 8)
    first = build_cache(cfg, model=tiny_model)

    def boom(*a, **k):
        raise AssertionError("the model was loaded or run on a cache hit")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models.LoadedModel, "run_to_hooks", boom)
    t = time.perf_counter()
    again = build_cache(dataclasses.replace(cfg, batch_size=2, progress=True))  # batch size is not in the key
    assert again.hit and again.key == first.key and again.n_seq == first.n_seq == 8
    assert time.perf_counter() - t < 2.0


def test_key_tracks_contents_only(tmp_cache_dir, cfg_for):
    base = cfg_for(tmp_cache_dir)
    key = plan(base).key
    assert key == plan(base).key and key.startswith("tiny_L1_ctx32_")
    same = dict(batch_size=7, chunk_seqs=16, inner_seqs=1, device="cpu", progress=True)
    for field, value in same.items():
        assert plan(dataclasses.replace(base, **{field: value})).key == key, field
    changes = dict(
        ctx=64,
        max_tokens=32 * 45,
        prepend_bos=False,
        dtype="bfloat16",
        store_dtype="float32",
        layers=(0,),
        split="validation",
        model="tiny:seed=1",
    )
    keys = {plan(dataclasses.replace(base, **{f: v})).key for f, v in changes.items()}
    assert len(keys) == len(changes) and key not in keys
    assert plan(dataclasses.replace(base, layers=(0, 1))).key.startswith("tiny_L0-1_ctx32_")


def test_sharded_layout_and_memory_url(tiny_model, tmp_cache_dir, cfg_for):
    plain = build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 20), model=tiny_model)
    url = f"memory://tsae-test-{time.time_ns()}"
    sharded = build_cache(cfg_for(url, max_tokens=32 * 20, inner_seqs=1), model=tiny_model)
    assert sharded.key == plain.key and sharded.location == f"{url}/{plain.key}"
    a = ActivationStore.open(plain.key)
    b = ActivationStore.open(plain.key, cache_dir=url)
    assert b.activations(HOOK).shards[0] == 8 and b.activations(HOOK).chunks[0] == 1
    np.testing.assert_array_equal(a.read(np.arange(20), HOOK)[0], b.read(np.arange(20), HOOK)[0])
    assert [s["key"] for s in list_stores(url)] == [plain.key]
    remove(plain.key, cache_dir=url)
    assert list_stores(url) == []


def test_open_refuses_mismatch_and_incomplete(tiny_model, tmp_cache_dir, cfg_for):
    r = build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 8), model=tiny_model)
    with pytest.raises(StoreError, match="built from tiny, not smollm2-135m"):
        ActivationStore.open(r.key, model="smollm2-135m")
    with pytest.raises(StoreError, match="not blocks.0.hook_resid_post"):
        ActivationStore.open(r.key, hook="blocks.0.hook_resid_post")
    other = dataclasses.replace(tiny_model, weights_hash="0" * 64)
    with pytest.raises(StoreError, match="weights"):
        ActivationStore.open(r.key, model=other)
    ActivationStore.open(r.key, model=tiny_model, hook=HOOK)  # the right model and hook are accepted
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open("tiny_L1_ctx32_000000000000")

    zjson = tmp_cache_dir / r.key / "zarr.json"  # pretend the build never finished
    zjson.write_text(zjson.read_text().replace('"status": "complete"', '"status": "building"'))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(r.key)
    assert ActivationStore.open(r.key, require_complete=False).n_seq == 8


def tokeniser_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cache-tokenise"]


def test_no_tokeniser_thread_outlives_a_build(tiny_model, tmp_cache_dir, monkeypatch, cfg_for):
    build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 16), model=tiny_model)
    assert not tokeniser_threads()

    forward, calls = models.LoadedModel.run_to_hooks, []

    def fails_in_chunk_2(self, tokens, hooks):
        calls.append(1)
        assert tokeniser_threads(), "no tokeniser thread during the build: this test would prove nothing"
        if len(calls) == 3:  # 2 forwards per chunk of 8 at batch 4; chunks 3-4 are queued meanwhile
            raise RuntimeError("forward failed")
        return forward(self, tokens, hooks)

    monkeypatch.setattr(models.LoadedModel, "run_to_hooks", fails_in_chunk_2)
    with pytest.raises(RuntimeError, match="forward failed"):  # keeps the build's frame alive
        build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 40), model=tiny_model)
    assert not tokeniser_threads()  # stopped and joined by the build itself, not by the collector
