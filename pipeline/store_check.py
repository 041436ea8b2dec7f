"""Checked reads: a consumer never receives data from a chunk whose bytes differ from what was written.

`ActivationStore` hands out its arrays (`activations(hook)`, `tokens`, `doc_id`, `doc_offset`) as
`CheckedArray`s.  The first read in this process that touches chunk ``c`` of an array hashes chunk
``c``'s stored bytes (sha256, the stored dtype, C order: `store_layout.checksum`) and compares the
digest with the one the writer put in ``manifest.json``.  On a mismatch (flipped bits, or a deleted
chunk file, which zarr silently reads as zeros) or an undecodable file (a truncated chunk), the read
raises `StoreError` naming the array, the chunk and its sequences, and returns nothing.

Cost: a verified chunk is never hashed again by this process, so later epochs pay nothing.  A read
that covers whole chunks (`WindowBatches` reads one chunk at a time) hashes the data it has already
read: sha256 runs at ~1.7 GB/s here, against ~0.4-0.7 GB/s for cold reads.  A read that covers part
of a not yet verified chunk (one sequence, one window) reads that whole chunk once to check it.
Chunks past the manifest's completed prefix (an incomplete store opened with
``require_complete=False``) have no checksum and are passed through unchecked.
"""

from __future__ import annotations

import threading

import numpy as np

from pipeline.errors import StoreError
from pipeline.store_layout import Manifest, checksum


class ChunkChecks:
    """What this process has verified in one store: the manifest's digests and a done-flag per chunk."""

    def __init__(self, key: str, manifest: Manifest):
        self.key, self.manifest = key, manifest
        self._done: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def done(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._done:
                self._done[name] = np.zeros(self.manifest.completed_chunks, dtype=bool)
            return self._done[name]

    def where(self, name: str, c: int) -> str:
        lo, hi = self.manifest.chunk_range(c)
        return f"chunk {c} (sequences {lo}-{hi - 1}) of {name} in store {self.key}"

    def damaged(self, name: str, c: int, why: str) -> StoreError:
        return StoreError(
            f"{self.where(name, c)} is damaged ({why}); the store is refused: run "
            f"`tsae-cache verify {self.key}`, then `tsae-cache repair {self.key}`"
        )


class CheckedArray:
    """A read-only zarr array whose reads are checked chunk by chunk against the manifest (see module).

    Supports what readers use: ``shape``, ``dtype``, ``ndim``, ``chunks``, ``shards``, ``len``,
    ``a[sel]``, ``a.get_orthogonal_selection(sel)`` and ``np.asarray(a)``; ``raw`` is the unchecked
    zarr array.  Other attributes are the zarr array's own.
    """

    def __init__(self, raw, name: str, checks: ChunkChecks):
        self.raw, self.name, self._checks = raw, name, checks
        self._c = checks.manifest.chunk_seqs

    def __getattr__(self, attr):
        return getattr(self.raw, attr)

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __repr__(self) -> str:
        return f"CheckedArray({self.name}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def __getitem__(self, sel):
        first = sel[0] if isinstance(sel, tuple) and sel else sel
        rest = sel[1:] if isinstance(sel, tuple) else ()
        whole_rows = all(isinstance(s, slice) and s == slice(None) for s in rest)
        if isinstance(first, slice) and first.step in (None, 1) and whole_rows:
            lo, hi, _ = first.indices(self.raw.shape[0])
            data = self._read(lambda: self.raw[sel], range(lo, max(hi, lo)))
            self._check_rows(data, lo, hi)
            return data
        self._check_chunks(self._rows(first))
        return self._read(lambda: self.raw[sel], None)

    def get_orthogonal_selection(self, selection, **kwargs):
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        self._check_chunks(self._rows(first))
        return self._read(lambda: self.raw.get_orthogonal_selection(selection, **kwargs), None)

    # ------------------------------------------------------------------------------------ checking
    def _rows(self, first) -> np.ndarray:
        """The sequence indices (axis 0) a selection touches."""
        n = self.raw.shape[0]
        if first is Ellipsis or first is None:
            return np.arange(n)
        if isinstance(first, slice):
            return np.arange(*first.indices(n))
        idx = np.asarray(first)
        if idx.dtype == bool:
            return np.flatnonzero(idx)
        return np.unique(idx.reshape(-1).astype(np.int64) % max(n, 1))

    def _pending(self, chunks) -> list[int]:
        done = self._checks.done(self.name)
        return [int(c) for c in chunks if c < len(done) and not done[c]]

    def _check_rows(self, data: np.ndarray, lo: int, hi: int) -> None:
        """Hash the chunks ``data`` (rows ``[lo, hi)``) covers whole; read the partly covered ones."""
        if hi <= lo:
            return
        m, n = self._checks.manifest, self.raw.shape[0]
        partial = []
        for c in self._pending(range(lo // self._c, (hi - 1) // self._c + 1)):
            c_lo, c_hi = c * self._c, min((c + 1) * self._c, m.n_seq, n)
            if lo <= c_lo and c_hi <= hi:
                self._compare(c, data[c_lo - lo : c_hi - lo])
            else:
                partial.append(c)
        self._check_chunks(np.asarray(partial, dtype=np.int64) * self._c)

    def _check_chunks(self, rows: np.ndarray) -> None:
        """Read and hash every not yet verified chunk holding one of ``rows``."""
        m, n = self._checks.manifest, self.raw.shape[0]
        for c in self._pending(np.unique(np.asarray(rows, dtype=np.int64) // self._c)):
            c_lo, c_hi = c * self._c, min((c + 1) * self._c, m.n_seq, n)
            self._compare(c, self._read(lambda lo=c_lo, hi=c_hi: self.raw[lo:hi], range(c_lo, c_hi)))

    def _compare(self, c: int, data: np.ndarray) -> None:
        want = self._checks.manifest.checksums.get(self.name, [])
        if c >= len(want):
            return
        if checksum(data) != want[c]:
            raise self._checks.damaged(self.name, c, "checksum mismatch")
        self._checks.done(self.name)[c] = True

    def _read(self, read, rows: range | None):
        """Run a zarr read; a decoding failure (a truncated or garbled file) becomes a StoreError that
        names the first unreadable chunk among ``rows`` (or among all chunks when unknown)."""
        try:
            return np.asarray(read())
        except StoreError:
            raise
        except Exception as e:  # zarr's codecs raise many types for a damaged file
            n = self.raw.shape[0]
            rows = rows if rows is not None else range(n)
            for c in range(rows.start // self._c, -(-rows.stop // self._c)):
                try:
                    self.raw[c * self._c : min((c + 1) * self._c, n)]
                except Exception:
                    raise self._checks.damaged(self.name, c, f"unreadable: {type(e).__name__}") from None
            raise StoreError(f"cannot read {self.name} of store {self._checks.key}: {e}") from None
