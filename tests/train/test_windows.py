"""WindowBatches: coverage, order, determinism, chunk-aligned reads, subsets, resume."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
import zarr

from tsae.data.windows import WindowBatches, window_starts

N_SEQ, CTX, D = 23, 20, 3


def coded_acts(n_seq=N_SEQ, ctx=CTX, d=D) -> np.ndarray:
    """acts[s, t, 0] = s, acts[s, t, 1] = t: every value says where it came from."""
    a = np.zeros((n_seq, ctx, d), dtype=np.float32)
    a[..., 0] = np.arange(n_seq)[:, None]
    a[..., 1] = np.arange(ctx)[None, :]
    a[..., 2] = np.random.default_rng(0).standard_normal((n_seq, ctx))
    return a


def windows_of(wb) -> list[tuple[int, int]]:
    out = []
    for b in wb:
        assert b.acts.dtype.is_floating_point and b.acts.shape[1:] == (wb.window, wb.d)
        # every window holds consecutive positions of one sequence, in order, matching seq/start
        assert (b.acts[..., 0] == b.seq[:, None].float()).all()
        expect_t = b.start[:, None] + torch.arange(wb.window)[None, :]
        assert (b.acts[..., 1].long() == expect_t).all()
        out += list(zip(b.seq.tolist(), b.start.tolist(), strict=True))
    return out


class CountingArray:
    """Array proxy recording every read slice (and whether any read was not chunk-aligned)."""

    def __init__(self, arr, chunk):
        self.arr, self.chunk, self.reads = arr, chunk, []
        self.shape, self.dtype = arr.shape, arr.dtype
        self.chunks, self.shards = getattr(arr, "chunks", None), getattr(arr, "shards", None)
        self.lock = threading.Lock()

    def __getitem__(self, key):
        lo, hi = key.start, key.stop
        with self.lock:
            self.reads.append((lo, hi))
        return self.arr[key]


@pytest.mark.parametrize("window", [5, 6, 20])
def test_every_window_once_per_epoch(window):
    a = coded_acts()
    wb = WindowBatches(a, window=window, batch_size=7, seed=3, chunk_seqs=4, buffer_chunks=2)
    starts = window_starts(CTX, window)
    got = windows_of(wb)
    counts = Counter(got)
    assert len(got) == wb.windows_per_epoch == N_SEQ * len(starts) == N_SEQ * -(-CTX // window)
    assert set(counts.values()) == {1}
    assert set(counts) == {(s, int(t)) for s in range(N_SEQ) for t in starts}
    # every position covered: the tail (ctx % w) is an end-aligned window, not dropped
    covered = np.zeros((N_SEQ, CTX), dtype=bool)
    for s, t in got:
        covered[s, t : t + window] = True
    assert covered.all()
    assert len(wb) == -(-len(got) // 7)


def test_tail_drop_is_explicit():
    assert window_starts(20, 6).tolist() == [0, 6, 12, 14]
    assert window_starts(20, 6, tail="drop").tolist() == [0, 6, 12]
    with pytest.raises(ValueError):
        window_starts(20, 21)


def test_seed_determinism_and_shuffling():
    a = coded_acts()
    kw = dict(window=5, batch_size=8, chunk_seqs=4, buffer_chunks=3)
    w0, w0b, w1 = (windows_of(WindowBatches(a, seed=s, **kw)) for s in (0, 0, 1))
    assert w0 == w0b
    assert w0 != w1 and sorted(w0) == sorted(w1)
    # shuffled across sequences, not sequential
    assert w0 != sorted(w0)
    # windows from different chunks mix inside a batch
    first = WindowBatches(a, seed=0, **kw)
    b = next(iter(first))
    assert len(set((b.seq // 4).tolist())) > 1


def test_zarr_chunk_aligned_reads(tmp_path):
    a = coded_acts(n_seq=40)
    z = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=a.shape, chunks=(8, CTX, D),
                          dtype="float16", compressors=None)
    z[:] = a
    t = zarr.create_array(store=str(tmp_path / "t.zarr"), shape=a.shape[:2], chunks=(8, CTX), dtype="int32")
    t[:] = (a[..., 0] * 1000 + a[..., 1]).astype(np.int32)
    proxy = CountingArray(z, 8)
    wb = WindowBatches(proxy, t, window=4, batch_size=16, seed=0, chunk_seqs=None, buffer_chunks=2)
    assert wb.chunk_seqs == 8  # detected from the zarr chunks
    seen = []
    for b in wb:
        assert (b.tokens == (b.seq[:, None] * 1000 + b.start[:, None] + torch.arange(4))).all()
        seen += list(zip(b.seq.tolist(), b.start.tolist(), strict=True))
    assert len(seen) == len(set(seen)) == 40 * 5
    # exactly one read per chunk, each a whole chunk
    assert sorted(proxy.reads) == [(i, i + 8) for i in range(0, 40, 8)]


def test_reads_are_lazy():
    a = coded_acts(n_seq=64)
    proxy = CountingArray(a, 4)
    it = iter(WindowBatches(proxy, window=5, batch_size=4, seed=0, chunk_seqs=4, buffer_chunks=2, prefetch=1))
    next(it)
    import time

    time.sleep(0.05)
    assert len(proxy.reads) <= 4 < 16  # current buffer + the one read ahead, not the whole array
    it.close()


def test_seq_indices_subset():
    a = coded_acts()
    sel = [1, 2, 3, 9, 17, 22]
    proxy = CountingArray(a, 4)
    wb = WindowBatches(proxy, window=5, batch_size=5, seed=0, seq_indices=sel, chunk_seqs=4)
    got = windows_of(wb)
    assert {s for s, _ in got} == set(sel)
    assert len(got) == len(set(got)) == len(sel) * 4 == wb.windows_per_epoch
    # reads stay inside the chunks that hold selected sequences, spanning only the selected ones
    assert sorted(proxy.reads) == [(1, 4), (9, 10), (17, 18), (22, 23)]
    with pytest.raises(ValueError):
        WindowBatches(a, window=5, batch_size=5, seq_indices=[0, 0])


def test_restart_fast_forwards_exactly():
    a = coded_acts()
    wb = WindowBatches(a, window=5, batch_size=6, seed=4, chunk_seqs=4, n_tokens=900)
    full = [(b.seq.tolist(), b.start.tolist()) for b in wb]
    for k in (1, 5, 13):
        tail = [(b.seq.tolist(), b.start.tolist()) for b in wb.restart(k)]
        assert tail == full[k:]


def test_n_tokens_mode_spans_epochs():
    a = coded_acts()
    per_epoch = N_SEQ * 4
    n_tokens = 5 * (2 * per_epoch + 3)  # two epochs and 3 windows
    wb = WindowBatches(a, window=5, batch_size=10, seed=0, chunk_seqs=4, n_tokens=n_tokens)
    got = windows_of(wb)
    assert len(got) * 5 == n_tokens
    assert len(wb) == -(-len(got) // 10)
    c = Counter(got[: 2 * per_epoch])
    assert set(c.values()) == {2}  # each window exactly once in each of the two epochs
    assert got[:per_epoch] != got[per_epoch : 2 * per_epoch]  # a fresh order per epoch


def test_drop_last_and_wait_time():
    a = coded_acts()
    wb = WindowBatches(a, window=5, batch_size=10, seed=0, chunk_seqs=4, drop_last=True)
    sizes = [len(b) for b in wb]
    assert sizes == [10] * (N_SEQ * 4 // 10)
    assert wb.wait_s > 0


def test_skip_leaves_out_leading_positions():
    a = coded_acts()
    assert window_starts(20, 6, skip=1).tolist() == [1, 7, 13, 14]
    wb = WindowBatches(a, window=6, batch_size=9, seed=0, chunk_seqs=4, skip=1)
    got = windows_of(wb)
    covered = np.zeros((N_SEQ, CTX), dtype=bool)
    for s, t in got:
        covered[s, t : t + 6] = True
    assert not covered[:, 0].any() and covered[:, 1:].all()
    assert wb.sample_sequences(5).shape == (5, CTX - 1, D)
