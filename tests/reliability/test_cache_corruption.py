"""Damaged stores: consumers refuse damaged chunks, `repair` recomputes only those and restores the store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from store_compare import TINY, chunk_file, differences, refusals, snapshot

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.cli_cache import main
from pipeline.errors import StoreError
from pipeline.export import export_hdf5
from pipeline.repair import repair_store
from pipeline.store import ActivationStore
from pipeline.verify import verify_store

HOOK = "blocks.1.hook_resid_post"
ACTS = f"acts/{HOOK}"


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("reference")
    r = build_cache(CacheConfig(**TINY, cache_dir=str(home)), model=tiny_model)
    return r.location, snapshot(r.location)


@pytest.fixture
def store(reference, tmp_cache_dir):
    """A fresh copy of the reference store under the test's cache home."""
    location, _ = reference
    copy = tmp_cache_dir / location.rsplit("/", 1)[1]
    shutil.copytree(location, copy)
    return copy


def test_reads_of_damaged_chunks_are_refused_and_intact_ones_served(store, reference):
    flip = chunk_file(store, ACTS, 2)
    raw = bytearray(flip.read_bytes())
    raw[4000] ^= 0x10
    flip.write_bytes(bytes(raw))
    truncated = chunk_file(store, "tokens", 5)
    truncated.write_bytes(truncated.read_bytes()[:-7])
    chunk_file(store, ACTS, 9).unlink()  # zarr would read zeros
    damage = {(2, ACTS): "flip", (5, "tokens"): "truncate", (9, ACTS): "delete"}

    assert refusals(store, damage) == []  # every chunk and array, one sequence read each
    s = ActivationStore.open(store)
    with pytest.raises(StoreError, match=r"chunk 2 \(sequences 16-23\) of acts/.* is damaged \(checksum"):
        s.read([17], HOOK)
    with pytest.raises(StoreError, match=r"chunk 5 \(sequences 40-47\) of tokens .*unreadable"):
        s.tokens[38:50]
    with pytest.raises(StoreError, match=r"chunk 9 .*tsae-cache repair"):
        s.window(75, 0, 8, HOOK)
    with pytest.raises(StoreError, match="is damaged"):
        export_hdf5(store, store.parent / "x.h5")
    assert not (store.parent / "x.h5").exists()
    # intact chunks read exactly the reference, checked or not
    want = reference[1]["arrays"]
    acts, toks = s.read(np.arange(24, 40), HOOK)
    np.testing.assert_array_equal(acts, want[ACTS][24:40].astype(np.float32))
    np.testing.assert_array_equal(toks, want["tokens"][24:40])
    raw_store = ActivationStore.open(store, checked=False)
    assert not np.array_equal(raw_store.activations(HOOK)[72:80], want[ACTS][72:80])  # unchecked: zeros

    # training data path: WindowBatches over the store stops at the first damaged chunk
    with pytest.raises(StoreError, match="is damaged"):
        for _ in s.iter_windows(HOOK, window=8, batch_size=32, seed=0):
            pass


def test_repair_recomputes_only_damaged_chunks_and_restores_the_reference(store, reference, tiny_model):
    for name, c in [(ACTS, 0), (ACTS, 11), ("doc_offset", 3)]:
        f = chunk_file(store, name, c)
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    zjson = store / "zarr.json"
    meta = json.loads(zjson.read_text())
    meta["attributes"]["stats"][HOOK]["mean_norm"] *= 1.5  # and a damaged statistic
    zjson.write_text(json.dumps(meta))
    assert sorted(verify_store(store).damaged) == [0, 3, 11]

    rep = repair_store(store, model=tiny_model)
    assert rep.chunks == {0: [ACTS], 3: ["doc_offset"], 11: [ACTS]}
    assert rep.exact == 3 and rep.changed == [] and rep.stats_updated
    assert rep.forward_tokens == 2 * 8 * 32  # only the two damaged activation chunks went through the model
    assert differences(reference[1], store) == []
    assert len(ActivationStore.open(store).attrs["repaired_at"]) == 1
    again = repair_store(store, model=tiny_model)
    assert again.chunks == {} and not again.stats_updated


def test_repair_cli_and_what_it_refuses(store, reference, tmp_cache_dir, tmp_path):
    key = store.name
    chunk_file(store, ACTS, 6).unlink()
    res = CliRunner().invoke(main, ["repair", key])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"repaired {key}: chunk 6: {ACTS}; restored bit for bit")
    assert differences(reference[1], store) == []
    assert CliRunner().invoke(main, ["repair", key]).stdout.startswith(f"nothing to repair: {key}")

    # damage no chunk rewrite can fix, and a source that changed since the build
    (store / "manifest.json").unlink()
    res = CliRunner().invoke(main, ["repair", key])
    assert res.exit_code == 2 and res.stderr.startswith("error: cannot repair") and "rm" in res.stderr
    assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1


def test_repair_refuses_when_the_source_changed(tiny_model, tmp_cache_dir):
    src = tmp_cache_dir.parent / "docs.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = CacheConfig(**{**TINY, "max_tokens": 32 * 16}, dataset=str(src), split="all")
    r = build_cache(cfg, model=tiny_model)
    chunk_file(tmp_cache_dir / r.key, ACTS, 1).unlink()
    src.write_text("Something else entirely. " * 300)
    with pytest.raises(StoreError, match="changed since the build"):
        repair_store(r.key, model=tiny_model)
