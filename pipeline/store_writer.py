"""The single writer of an activation store: creates or resumes it, writes whole chunks, keeps the manifest.

Protocol (what makes a store safe to interrupt at any instant, `kill -9` included):

1. The group is created with ``status = "building"`` and every array preallocated to a capacity of
   whole chunks (from ``max_tokens`` when known, else grown by doubling; only this writer resizes).
2. Chunk c (sequences ``[c*C, (c+1)*C)`` of every array) is written in full, in order.  Then its
   sha256 per array and its float64 stat sums join the in-memory manifest.
3. ``manifest.json`` is replaced atomically (LocalStore writes a temporary file and renames it)
   after a chunk whenever the previous replacement is old enough relative to its own cost (so it
   never takes more than ~2% of the writer's time); always at close.  A chunk is *completed* once a
   manifest naming it is on disk; a crash loses at most the chunks written since, which a resumed
   build simply rewrites (sequence order is deterministic).
4. `finish` trims the arrays to ``n_seq``, writes the final manifest, then sets the root attributes
   ``status = "complete"``, ``n_seq`` and ``stats``: the last write, so a reader never sees a
   complete status over missing data.

A store is also guarded by the builder's lock on ``.build.lock`` (`pipeline.store_lock`: a ``flock``
the OS releases if the process dies, or on S3 a renewed lease that goes stale if it dies), so two
builds of one key cannot interleave; a writer that lost its lease stops before its next chunk.
`BackgroundWriter` runs a writer on its own thread behind a bounded queue, so the model never waits
for the disk, checksums or stats.
"""

from __future__ import annotations

import datetime as _dt
import errno
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from pipeline.errors import StoreError
from pipeline.store_layout import (
    DOC_ID,
    DOC_OFFSET,
    MANIFEST_KEY,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    TOKENS,
    Manifest,
    StatSums,
    acts_name,
    checksum,
    manifest_problem,
    normalise,
    open_group,
    read_key,
    write_key,
    zarr_store,
)
from pipeline.store_lock import check_held, lock_builder, unlock

FLUSH_OVERHEAD = 0.02  # at most this share of wall time goes to rewriting the manifest


class ManifestFlush:
    """Rewrites manifest.json when chunks completed since the last rewrite (`dirty`).  Unforced
    rewrites are throttled: the next one waits until the last one's cost is FLUSH_OVERHEAD of the
    time since, so a slow store (S3) is rewritten less often.  Shared by StoreWriter and the
    distributed ShareWriter (rank 0)."""

    def __init__(self, store, check=None):
        self.store, self.dirty, self.check = store, False, check  # check(): raises if the lease is lost
        self._last, self._cost = time.perf_counter(), 0.0

    def __call__(self, manifest: Manifest, force: bool = True) -> bool:
        """Rewrite if dirty and (forced or due); True when it wrote.  OSError propagates, and so does
        `check`'s StoreError, raised right before the write (a builder that lost its lease must not
        overwrite the new holder's manifest)."""
        now = time.perf_counter()
        if not self.dirty or (not force and now - self._last < self._cost / FLUSH_OVERHEAD):
            return False
        if self.check is not None:
            self.check()
        write_key(self.store, MANIFEST_KEY, manifest.to_bytes())
        self._last = time.perf_counter()
        self._cost, self.dirty = self._last - now, False
        return True


@dataclass
class Chunk:
    """One write unit: sequences ``[index * chunk_seqs, index * chunk_seqs + n)`` of every array."""

    index: int
    acts: dict[str, np.ndarray]  # hook -> [n, ctx, d] in the stored dtype
    tokens: np.ndarray  # int32 [n, ctx]
    doc_id: np.ndarray  # int64 [n]
    doc_offset: np.ndarray  # int64 [n]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {acts_name(h): a for h, a in self.acts.items()}
        out.update({TOKENS: self.tokens, DOC_ID: self.doc_id, DOC_OFFSET: self.doc_offset})
        return out


def chunk_sums(chunk: Chunk, start: int) -> dict[str, StatSums]:
    """Each hook's float64 stat sums over ``chunk`` (whose first sequence is ``start``), checked: a
    chunk holding NaN/Inf is refused before any of it is written (every writer calls this)."""
    sums, end = {h: StatSums.of(a) for h, a in chunk.acts.items()}, start + len(chunk.tokens) - 1
    for h, s in sums.items():
        if not np.isfinite(s.sum).all() or not np.isfinite(s.sum_sq_norm):
            raise StoreError(
                f"chunk {chunk.index} of {h} holds NaN/Inf (sequences {start}-{end})"
                "; with --store-dtype float16 this means values beyond +-65504: use float32"
            )
    return sums


@dataclass
class Layout:
    """Array geometry.  ``inner_seqs=None``: plain chunks of ``chunk_seqs`` whole sequences;
    an int: shards of ``chunk_seqs`` sequences made of inner chunks of ``inner_seqs`` sequences."""

    hooks: list[str]
    ctx: int
    d_model: int
    store_dtype: str
    chunk_seqs: int = 64
    inner_seqs: int | None = None

    def specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Array name -> (shape of one row, dtype)."""
        out = {acts_name(h): ((self.ctx, self.d_model), self.store_dtype) for h in self.hooks}
        out.update({TOKENS: ((self.ctx,), "int32"), DOC_ID: ((), "int64"), DOC_OFFSET: ((), "int64")})
        return out


class StoreComplete(StoreError):
    """The store a writer was asked to open is complete already (another process finished it)."""


def _utcnow() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class StoreWriter:
    """Creates or resumes one store; `write` takes chunks in order; `finish` marks it complete."""

    def __init__(self, location, group, manifest: Manifest, layout: Layout, lock_fd: int | None):
        self.location, self.group, self.manifest, self.layout = location, group, manifest, layout
        self._lock_fd = lock_fd
        self._store = group.store
        self._arrays = {name: group[name] for name in layout.specs()}
        self._capacity = next(iter(self._arrays.values())).shape[0]
        self._flush = ManifestFlush(self._store, check=self.check_lock)
        self.durable_chunks = manifest.completed_chunks  # chunks named by the manifest on disk

    # ---------------------------------------------------------------------------- open / create
    @classmethod
    def open(
        cls, location, *, attrs: dict, layout: Layout, batch_size: int, capacity_seqs: int
    ) -> StoreWriter:
        """Resume the store at ``location`` if it exists with status building, else create it.

        ``attrs["key"]`` must match an existing store's key.  Raises StoreError when the store is
        already complete, belongs to another key, or is being built by another process.
        """
        import zarr

        location = normalise(location)
        lock_fd = lock_builder(location)
        try:
            store = zarr_store(location, read_only=False)
            if read_key(store, "zarr.json") is not None:
                from pipeline.store import read_attrs

                have = read_attrs(location)  # StoreError if its attributes are damaged
                if have is None:
                    raise StoreError(
                        f"{location} holds no readable activation store; remove it and build again"
                    )
                group = open_group(store, "r+")
                if have.get("key") != attrs["key"]:
                    raise StoreError(f"{location} holds store {have.get('key')!r}, not {attrs['key']!r}")
                if have.get("status") == STATUS_COMPLETE:
                    raise StoreComplete(f"store {attrs['key']} is already complete")
                if (have["chunk_seqs"], have.get("inner_seqs")) != (layout.chunk_seqs, layout.inner_seqs):
                    raise StoreError(
                        f"{location} was started with chunk_seqs={have['chunk_seqs']}, "
                        f"inner_seqs={have.get('inner_seqs')}; resume it with the same layout"
                    )
                group.attrs.update({"resumed_at": [*have.get("resumed_at", []), _utcnow()]})
                raw = read_key(store, MANIFEST_KEY)
                if raw is not None and all(name in group for name in layout.specs()):
                    m = Manifest.from_bytes(raw)
                    problem = manifest_problem(m, layout.hooks, layout.d_model, layout.chunk_seqs)
                    if problem:
                        raise StoreError(f"{location}: manifest.json is damaged ({problem}); remove it")
                    return cls(location, group, m, layout, lock_fd)
                # killed while creating the arrays: nothing was completed, so start them afresh
            else:
                group = zarr.create_group(store, attributes=_initial_attrs(attrs, layout))
            _create_arrays(group, layout, capacity_seqs)
            manifest = _fresh_manifest(layout, batch_size)
            write_key(store, MANIFEST_KEY, manifest.to_bytes())
            return cls(location, group, manifest, layout, lock_fd)
        except OSError as e:  # e.g. the disk filled while the arrays were created: nothing was completed
            unlock(lock_fd)
            full = "disk full" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror or e})"
            raise StoreError(
                f"{full} while opening the store in {location}; rerun the same command to resume"
                + (" after freeing space" if e.errno == errno.ENOSPC else "")
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # zarr on damaged metadata
            unlock(lock_fd)
            raise StoreError(
                f"{location} is damaged ({type(e).__name__} reading its metadata); remove it and build again"
            ) from None
        except BaseException:
            unlock(lock_fd)
            raise

    @property
    def n_seq(self) -> int:
        """Sequences durably written so far (a prefix of the build's sequence order)."""
        return self.manifest.n_seq

    # ------------------------------------------------------------------------------------- write
    def write(self, chunk: Chunk) -> None:
        self.check_lock()
        m = self.manifest
        if chunk.index != m.completed_chunks:
            raise RuntimeError(f"chunk {chunk.index} written out of order (expected {m.completed_chunks})")
        start = chunk.index * m.chunk_seqs
        arrays = chunk.arrays()
        n = len(chunk.tokens)
        sums = chunk_sums(chunk, start)
        try:
            self._ensure_capacity(start + n)
            for name, data in arrays.items():
                self._arrays[name][start : start + n] = data
        except OSError as e:
            raise _io_error(
                e, f"writing chunk {chunk.index} (sequences {start}-{start + n - 1})", self
            ) from None
        for name, data in arrays.items():
            m.checksums.setdefault(name, []).append(checksum(data))
        for h, s in sums.items():
            m.sums[h] = m.sums[h] + s
        m.completed_chunks += 1
        m.n_seq = start + n
        self._flush.dirty = True
        self.flush(force=False)

    def manifest_changed(self) -> None:
        """The manifest gained chunks another writer recorded (distributed build): flush it."""
        self._flush.dirty = True

    def flush(self, force: bool = True) -> None:
        """Replace manifest.json if chunks completed since the last time (and, unless forced, it is due)."""
        try:
            wrote = self._flush(self.manifest, force)
        except OSError as e:
            raise _io_error(e, "writing manifest.json", self) from None
        if wrote:
            self.durable_chunks = self.manifest.completed_chunks

    def finish(self, extra_attrs: dict) -> dict:
        """Trim to the sequences written, record stats, set status complete; returns the final attrs."""
        m = self.manifest
        if m.n_seq == 0:
            raise StoreError("no sequence was written")
        self.check_lock()
        try:
            for arr in self._arrays.values():
                arr.resize((m.n_seq, *arr.shape[1:]))
            self.flush(force=True)
            attrs = {
                **extra_attrs,
                "n_seq": m.n_seq,
                "n_chunks": m.completed_chunks,
                "stats": {h: s.stats() for h, s in m.sums.items()},
                "completed_at": _utcnow(),
                "status": STATUS_COMPLETE,
            }
            self.group.attrs.update(attrs)
        except OSError as e:
            raise _io_error(e, "finishing the store", self) from None
        return dict(self.group.attrs)

    def check_lock(self) -> None:
        """StoreError if this writer lost its lease on an object store (another may build now)."""
        check_held(self._lock_fd)

    def close(self) -> None:
        """Flush what is done (best effort) and release the build lock."""
        try:
            self.flush(force=True)
        except StoreError:
            pass
        finally:
            unlock(self._lock_fd)
            self._lock_fd = None

    def _ensure_capacity(self, n: int) -> None:
        if n <= self._capacity:
            return
        c = self.manifest.chunk_seqs
        new = max(2 * self._capacity, -(-n // c) * c)
        for arr in self._arrays.values():
            arr.resize((new, *arr.shape[1:]))
        self._capacity = new


def _fresh_manifest(layout: Layout, batch_size: int) -> Manifest:
    return Manifest(
        layout.chunk_seqs, batch_size, sums={h: StatSums.zeros(layout.d_model) for h in layout.hooks}
    )


def _initial_attrs(attrs: dict, layout: Layout) -> dict:
    return {
        **attrs,
        "status": STATUS_BUILDING,
        "chunk_seqs": layout.chunk_seqs,
        "inner_seqs": layout.inner_seqs,
        "created_at": _utcnow(),
    }


def _create_arrays(group, layout: Layout, capacity_seqs: int) -> None:
    """Every array preallocated to whole chunks (replacing any half-created one)."""
    c = layout.chunk_seqs
    capacity = max(-(-capacity_seqs // c), 1) * c
    for name, (row, dtype) in layout.specs().items():
        if layout.inner_seqs is None:
            chunks, shards = (c, *row), None
        else:
            chunks, shards = (layout.inner_seqs, *row), (c, *row)
        group.create_array(
            name,
            shape=(capacity, *row),
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=None,
            fill_value=0,
            dimension_names=["seq", "pos", "d"][: 1 + len(row)],
            overwrite=True,
        )


def _io_error(e: OSError, what: str, writer: StoreWriter) -> StoreError:
    """A one-line error that counts the chunks the manifest on disk names (what a resume keeps):
    the manifest is replaced first if it can be, which on a full disk it often cannot."""
    try:
        if writer._flush(writer.manifest, force=True):
            writer.durable_chunks = writer.manifest.completed_chunks
    except (OSError, StoreError):  # cannot write it, or the lease is lost: leave the manifest alone
        pass
    kept = f"the {writer.durable_chunks} completed chunks are kept; rerun the same command to resume"
    if e.errno == errno.ENOSPC:
        return StoreError(f"disk full while {what} in {writer.location}: {kept} after freeing space")
    return StoreError(f"cannot write {writer.location} ({what}): {e.strerror or e}; {kept}")


# ---------------------------------------------------------------------------------- writer thread
class BackgroundWriter:
    """Runs `StoreWriter.write` on a thread behind a queue of ``depth`` chunks.

    `put` blocks only when the queue is full (the disk is slower than the model) and re-raises a
    writer failure in the caller's thread; `close` waits for queued chunks and flushes the manifest.
    """

    def __init__(self, writer: StoreWriter, depth: int = 2):
        self.writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.busy_s = 0.0  # time the thread spent writing (stats, checksums, zarr)
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._q.get()
            if chunk is None:
                return
            if self._error is not None:
                continue  # drain after a failure so `put` never blocks forever
            t = time.perf_counter()
            try:
                self.writer.write(chunk)
            except BaseException as e:  # surfaced by put/close in the main thread
                self._error = e
            self.busy_s += time.perf_counter() - t

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk: Chunk) -> None:
        while True:
            self._check()
            try:
                self._q.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish the queued chunks, stop the thread, flush; re-raise a write failure if one happened."""
        self._q.put(None)
        self._thread.join()
        self._check()
        self.writer.flush(force=True)

    def close_after_error(self) -> None:
        """`close` when the caller is already raising: a write failure here is secondary, dropped."""
        try:
            self.close()
        except BaseException:
            pass
