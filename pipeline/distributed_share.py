"""Distributed caching, one worker's share: the chunks ``c % W == r``, written with their records.

A worker computes its chunks straight into the arrays rank 0 preallocated (`ShareWriter`, on a
`BackgroundWriter` thread), then writes each chunk's record ``done/<c>.json``: the sha256 of every
array's chunk, the float64 stat sums, who and when.  A chunk is complete once its record exists.
`fold` appends records to the manifest in chunk order, exactly as the single-process writer adds
its chunks, so the final checksums and stats are bit-identical.  On a local disk worker r holds
the lock ``.build.lock.<r>`` while it runs.  The protocol: `pipeline.distributed_cache`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from pipeline.cache_chunks import forward_chunk, tokenised_chunks
from pipeline.distributed_launch import Comm
from pipeline.errors import StoreError, UserError
from pipeline.store_layout import (
    LOCK_FILE,
    MANIFEST_KEY,
    Manifest,
    StatSums,
    array_names,
    checksum,
    read_key,
    to_json,
    write_key,
    zarr_store,
)
from pipeline.store_lock import is_held, try_lock, unlock
from pipeline.store_writer import BackgroundWriter, Chunk, StoreWriter, chunk_sums

RECORDS = "done"  # folder of per-chunk records while a distributed build runs
_RECORD_NAME = re.compile(r"^(\d{8})\.json$")  # not a writer's temporary file


def record_key(chunk: int) -> str:
    return f"{RECORDS}/{chunk:08d}.json"


def chunk_record(chunk: Chunk, sums: dict[str, StatSums], rank: int, world_size: int) -> dict:
    """What the single-process writer keeps in memory per chunk, as one JSON object."""
    return {
        "chunk": chunk.index,
        "n_seq": len(chunk.tokens),
        "checksums": {name: checksum(data) for name, data in chunk.arrays().items()},
        "sums": {h: s.to_json() for h, s in sums.items()},
        "rank": rank,
        "world_size": world_size,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def recorded_chunks(store) -> set[int]:
    """Indices of the chunks whose record exists (one LIST request on an object store)."""
    from zarr.core.sync import sync

    async def keys():
        return [k async for k in store.list_prefix(f"{RECORDS}/")]

    fs = getattr(store, "fs", None)  # fsspec caches listings; other processes write records
    if fs is not None:
        fs.invalidate_cache()

    names = (_RECORD_NAME.match(k.rsplit("/", 1)[1]) for k in sync(keys()))
    return {int(m.group(1)) for m in names if m}


def fold(manifest: Manifest, store, stop: int | None = None) -> int:
    """Append to ``manifest`` the records of chunks ``completed_chunks, completed_chunks + 1, ...``
    while they exist (up to ``stop``); returns how many were added.  Same order as the single writer,
    so the float64 sums are bit-identical."""
    added = 0
    while stop is None or manifest.completed_chunks < stop:
        c = manifest.completed_chunks
        raw = read_key(store, record_key(c))
        if raw is None:
            break
        bad = StoreError(f"record {record_key(c)} does not describe chunk {c}; remove it and rerun")
        try:
            rec = json.loads(raw)
            if rec["chunk"] != c or not 0 < rec["n_seq"] <= manifest.chunk_seqs:
                raise bad
            checksums = {name: str(digest) for name, digest in rec["checksums"].items()}
            sums = {h: StatSums.from_json(s) for h, s in rec["sums"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):  # damaged or foreign record
            raise bad from None
        if set(sums) - set(manifest.sums):
            raise bad
        for name, digest in checksums.items():
            manifest.checksums.setdefault(name, []).append(digest)
        for h, s in sums.items():
            manifest.sums[h] = manifest.sums[h] + s
        manifest.completed_chunks += 1
        manifest.n_seq = c * manifest.chunk_seqs + rec["n_seq"]
        added += 1
    return added


class ShareWriter:
    """Writes one worker's chunks straight into the preallocated arrays, then each chunk's record.

    On rank 0 it also folds finished records into ``manifest.json`` as they appear (progress for
    ``ls`` and a resumable prefix for a plain build).  It has StoreWriter's ``write``/``flush``, so a
    `BackgroundWriter` runs it on its own thread behind a queue.
    """

    def __init__(self, group, hooks: list[str], rank: int, world_size: int, writer: StoreWriter | None):
        self.group, self.store = group, group.store
        self.rank, self.world_size = rank, world_size
        self.writer = writer  # rank 0 only: its manifest, throttled flush and lease check
        self._arrays = {name: group[name] for name in array_names(hooks)}
        self._capacity = next(iter(self._arrays.values())).shape[0]
        self._chunk_seqs = int(group.attrs["chunk_seqs"])

    def write(self, chunk: Chunk) -> None:
        start, n = chunk.index * self._chunk_seqs, len(chunk.tokens)
        if start + n > self._capacity:
            raise StoreError(
                f"chunk {chunk.index} ends at sequence {start + n}, beyond the {self._capacity} "
                "rank 0 preallocated; the corpus changed since the store was started"
            )
        sums = chunk_sums(chunk, start)
        try:
            for name, data in chunk.arrays().items():
                self._arrays[name][start : start + n] = data
            write_key(
                self.store,
                record_key(chunk.index),
                to_json(chunk_record(chunk, sums, self.rank, self.world_size)),
            )
        except OSError as e:
            raise StoreError(
                f"cannot write chunk {chunk.index} to the store: {e.strerror or e}; recorded chunks "
                "are kept, rerun the same command to resume"
            ) from None
        if self.writer is not None:
            if fold(self.writer.manifest, self.store) > 0:
                self.writer.manifest_changed()
            self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Rank 0: replace manifest.json when chunks were folded since (StoreWriter.flush: throttled,
        lease checked, I/O errors as one line)."""
        if self.writer is not None:
            self.writer.flush(force)


def run_share(cfg, model, p, comm: Comm, writer: StoreWriter | None) -> dict:
    """Compute and write the chunks ``c % W == rank`` that are not recorded yet; a `UserError`
    becomes the outcome's ``error`` so every rank still reaches the gather."""
    import zarr

    from pipeline.sequences import SequenceStats

    rank, world = comm.rank, comm.world_size
    group = zarr.open_group(zarr_store(p.location, read_only=False), mode="r+")
    store = group.store
    raw = read_key(store, MANIFEST_KEY) if writer is None else None
    if writer is None and raw is None:
        raise StoreError(f"store {p.key} is not ready (no manifest.json): rerun its rank 0 first")
    manifest = writer.manifest if writer is not None else Manifest.from_bytes(raw)
    chunk_seqs, batch_size = int(group.attrs["chunk_seqs"]), manifest.batch_size
    outcome = {"rank": rank, "computed_tokens": 0, "resumed_seqs": 0, "model_seconds": 0.0}
    lock = None
    try:
        lock = _lock_share(p.location, rank, world, group.attrs)
        recorded = recorded_chunks(store)
        done = recorded | set(range(manifest.completed_chunks))
        share = ShareWriter(group, p.hooks, rank, world, writer)
        counters = SequenceStats()
        chunks = tokenised_chunks(cfg, model.tokenizer, chunk_seqs, counters)
        bar = _progress(cfg, p.key, rank, world)
        bg = BackgroundWriter(share)
        n_chunks = n_seq = 0
        t_share, cpu_share = time.perf_counter(), time.process_time()
        try:
            for index, tokens, doc_id, doc_offset in chunks:
                n_chunks, n_seq = index + 1, index * chunk_seqs + len(tokens)
                if index % world != rank:
                    continue
                if index in done:
                    outcome["resumed_seqs"] += len(tokens)
                    continue
                t = time.perf_counter()
                acts = forward_chunk(model, tokens, p.hooks, batch_size, cfg.store_dtype)
                outcome["model_seconds"] += time.perf_counter() - t
                bg.put(Chunk(index, acts, tokens, doc_id, doc_offset))
                outcome["computed_tokens"] += tokens.size
                bar.update(tokens.size)
            bg.close()
        except BaseException:
            bg.close_after_error()
            raise
        finally:
            chunks.close()  # stop the tokeniser thread whichever way the share ends
            bar.close()
        outcome.update(
            n_chunks=n_chunks,
            n_seq=n_seq,
            sequences=counters.as_dict(),
            writer_busy_seconds=bg.busy_s,
            share_seconds=time.perf_counter() - t_share,
            share_cpu_seconds=time.process_time() - cpu_share,  # every thread of this worker
        )
    except UserError as e:
        outcome["error"] = f"worker {rank}/{world}: {e}"
    finally:
        unlock(lock)
    return outcome


def _lock_share(location, rank: int, world: int, attrs) -> int | None:
    """Local stores: an exclusive flock on ``.build.lock.<rank>`` (released by the OS if the process
    dies); refuses a share of another W while the builder lock shows a job with that other W runs."""
    if not isinstance(location, Path):
        return None
    running = attrs.get("distributed", {}).get("world_size")
    if rank > 0 and running not in (None, world) and is_held(location / LOCK_FILE):
        raise StoreError(
            f"a build with {running} workers is running on {location}; its shares are r/{running}"
        )
    return try_lock(
        location / f"{LOCK_FILE}.{rank}", f"another process is computing share {rank}/{world} of {location}"
    )


def _progress(cfg, key: str, rank: int, world: int):
    from tqdm.auto import tqdm

    return tqdm(
        unit="tok",
        unit_scale=True,
        desc=f"{key[:32]} [worker {rank}/{world}]",
        disable=not cfg.progress or rank != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
