"""Damage and failure: verify names damaged chunks, HDF5 export round-trips, a full disk is resumable."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil

import h5py
import numpy as np
import pytest
import zarr.storage._local as zarr_local
from click.testing import CliRunner

from pipeline.cache_runner import build_cache
from pipeline.cli_cache import main
from pipeline.errors import StoreError
from pipeline.export import export_hdf5, read_hdf5_attrs
from pipeline.store import ActivationStore
from pipeline.verify import verify_store

HOOK = "blocks.1.hook_resid_post"


def test_verify_names_flipped_truncated_and_missing_chunks(tiny_model, tmp_cache_dir, cfg_for):
    r = build_cache(cfg_for(tmp_cache_dir), model=tiny_model)
    rep = verify_store(r.key)
    assert rep.ok and rep.n_chunks == 6 and rep.n_seq == 44 and rep.bytes_read > 44 * 32 * 64 * 2

    root = tmp_cache_dir / r.key
    flipped = root / "acts" / HOOK / "c" / "2" / "0" / "0"
    raw = bytearray(flipped.read_bytes())
    raw[1000] ^= 0x01  # one low mantissa bit of one float16
    flipped.write_bytes(bytes(raw))
    truncated = root / "acts" / HOOK / "c" / "3" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (root / "tokens" / "c" / "4" / "0").unlink()

    problems = verify_store(r.key).problems
    assert any(p.startswith(f"chunk 2 (sequences 16-23) of acts/{HOOK}: checksum mismatch") for p in problems)
    assert any(p.startswith(f"chunk 3 (sequences 24-31) of acts/{HOOK}: unreadable") for p in problems)
    assert any(p.startswith("chunk 4 (sequences 32-39) of tokens: chunk file missing") for p in problems)
    assert len(problems) == 3, problems

    res = CliRunner().invoke(main, ["verify", r.key])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "chunk 2 (sequences 16-23)" in res.stderr and res.stderr.strip().splitlines()[-1].startswith(
        "error:"
    )


def test_verify_catches_stats_that_disagree(tiny_model, tmp_cache_dir, cfg_for):
    r = build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 16), model=tiny_model)
    zjson = tmp_cache_dir / r.key / "zarr.json"
    meta = json.loads(zjson.read_text())
    meta["attributes"]["stats"][HOOK]["mean_norm"] *= 1.001
    zjson.write_text(json.dumps(meta))
    assert verify_store(r.key).problems == [
        f"stats of {HOOK}: mean_norm {meta['attributes']['stats'][HOOK]['mean_norm']:.6g} recorded, "
        f"{meta['attributes']['stats'][HOOK]['mean_norm'] / 1.001:.6g} recomputed"
    ]


def test_hdf5_export_round_trip(tiny_model, tmp_cache_dir, tmp_path, cfg_for, store_arrays):
    r = build_cache(cfg_for(tmp_cache_dir, layers=(0, 1), max_tokens=32 * 20), model=tiny_model)
    store = ActivationStore.open(r.key)
    out = export_hdf5(r.key, tmp_path / "acts.h5")
    with h5py.File(out, "r") as f:
        for name, want in store_arrays(store).items():
            assert f[name].dtype == want.dtype
            np.testing.assert_array_equal(f[name][:], want)
        assert f.attrs["key"] == r.key and f.attrs["n_seq"] == 20
    assert read_hdf5_attrs(out) == store.attrs
    with pytest.raises(Exception, match="exists"):
        export_hdf5(r.key, out)
    res = CliRunner().invoke(main, ["export", r.key, "--format", "hdf5", str(out), "--overwrite"])
    assert res.exit_code == 0 and read_hdf5_attrs(out)["key"] == r.key


def test_disk_full_keeps_completed_chunks_then_resumes(
    tiny_model, tmp_cache_dir, tmp_path, monkeypatch, cfg_for, store_arrays
):
    reference = build_cache(cfg_for(tmp_path / "ref"), model=tiny_model)
    real_put, chunk_writes = zarr_local._put, []

    def put_until_full(path, value, exclusive=False):
        if "/c/" in str(path):  # chunk files only: the manifest still fits, as on a nearly full disk
            chunk_writes.append(path)
            if len(chunk_writes) > 4 * 3:  # 4 arrays per chunk: chunks 0-2 fit, chunk 3 does not
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put_until_full)
    cfg = cfg_for(tmp_cache_dir)
    with pytest.raises(
        StoreError, match=r"disk full while writing chunk 3 \(sequences 24-31\).*3 completed chunks"
    ):
        build_cache(cfg, model=tiny_model)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(reference.key)
    assert ActivationStore.open(reference.key, require_complete=False).n_seq == 24

    monkeypatch.setattr(zarr_local, "_put", real_put)
    # the store's own batch size and chunk layout win over new settings, so batches are identical
    resumed = build_cache(dataclasses.replace(cfg, batch_size=8, chunk_seqs=16), model=tiny_model)
    assert resumed.resumed_seqs == 24 and resumed.computed_tokens == 20 * 32 and resumed.key == reference.key
    a, b = ActivationStore.open(resumed.key), ActivationStore.open(reference.location)
    got = store_arrays(a)
    for name, want in store_arrays(b).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert a.attrs["stats"] == b.attrs["stats"] and verify_store(resumed.key).ok


def test_killed_while_creating_arrays_starts_afresh(tiny_model, tmp_cache_dir, cfg_for, store_arrays):
    r = build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 16), model=tiny_model)
    want = store_arrays(ActivationStore.open(r.key))
    root = tmp_cache_dir / r.key
    shutil.rmtree(root / "tokens")  # as if killed after the group and some arrays were created
    (root / "manifest.json").unlink()
    zjson = root / "zarr.json"
    zjson.write_text(zjson.read_text().replace('"status": "complete"', '"status": "building"'))
    again = build_cache(cfg_for(tmp_cache_dir, max_tokens=32 * 16), model=tiny_model)
    assert not again.hit and again.resumed_seqs == 0 and verify_store(r.key).ok
    for name, arr in store_arrays(ActivationStore.open(r.key)).items():
        np.testing.assert_array_equal(arr, want[name], err_msg=name)
