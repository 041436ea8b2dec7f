"""The shared lock and chunk check every store writer uses (`pipeline.store_lock`, `chunk_sums`)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.store_layout import LOCK_FILE
from pipeline.store_lock import is_held, lock_builder, try_lock, unlock
from pipeline.store_writer import Chunk, chunk_sums


def test_try_lock_refuses_a_second_holder_until_released(tmp_path):
    path = tmp_path / "share.lock"
    assert not is_held(path) and not path.exists()  # looking creates nothing
    fd = try_lock(path, "busy: wait")
    assert is_held(path)
    with pytest.raises(StoreError, match="^busy: wait$"):  # flock is per open file: same process too
        try_lock(path, "busy: wait")
    unlock(fd)
    assert not is_held(path)
    unlock(try_lock(path, "busy: wait"))
    with pytest.raises(StoreError, match="^cannot create"):
        try_lock(tmp_path / "no" / "such" / "dir.lock", "busy")


def test_builder_lock_creates_the_store_folder_and_names_it(tmp_path):
    location = tmp_path / "key"
    fd = lock_builder(location)
    assert is_held(location / LOCK_FILE)
    with pytest.raises(StoreError, match=f"another process is building {location}"):
        lock_builder(location)
    unlock(fd)
    assert lock_builder("memory://bucket/key") is None  # no lock but on S3 (leases: test_store_lease.py)


def test_chunk_sums_refuses_nan_and_inf_naming_the_sequences():
    acts = np.zeros((4, 8, 16), dtype=np.float16)
    chunk = Chunk(3, {"h": acts}, np.zeros((4, 8), np.int32), np.zeros(4, np.int64), np.zeros(4, np.int64))
    sums = chunk_sums(chunk, 12)
    assert sums["h"].sum.shape == (16,) and np.all(sums["h"].sum == 0)
    for bad in (np.nan, np.inf):
        acts[2, 5, 7] = bad
        with pytest.raises(StoreError, match=r"chunk 3 of h holds NaN/Inf \(sequences 12-15\)"):
            chunk_sums(chunk, 12)
