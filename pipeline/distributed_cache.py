"""Distributed caching: W workers, each with its own model replica, fill ONE activation store.

    torchrun --standalone --nproc-per-node 2 -m pipeline.cli_cache build --model tiny --max-tokens 20k
    tsae-cache build --workers 2 ...      # the same: the CLI starts torchrun for you
    tsae-cache build --shard 1/2 ...      # worker 1's share alone (rerun a worker that died)
    tsae-cache build ...                  # a plain build finishes a store that workers started

Partition.  Sequence enumeration is deterministic (`pipeline.sequences`), so chunk c, the sequences
``[c*C, (c+1)*C)``, holds the same tokens on every worker.  Worker r of W computes the chunks with
``c % W == r``, in batches that depend only on the chunk, so every value is bit-identical to a
single-process build.  A chunk is one zarr chunk (or one whole shard): no two processes ever write
the same chunk file.

Who writes what:

- rank 0 alone creates the group and preallocates every array (to the sequences the corpus gives:
  from max_tokens when that is at most `PREALLOC_CHUNKS` chunks, else a counting pass), writes the
  root attributes and ``manifest.json``, and at the end trims the arrays and marks the store complete;
- every worker writes its chunks' data, then the chunk's record ``done/<c>.json`` (sha256 per array,
  float64 stat sums, who and when): one object per chunk, written by one process, after the data;
- rank 0 folds records into ``manifest.json`` in chunk order (the single-process writer's prefix
  invariant), so checksums and stat sums are added in the same order: final stats are bit-identical.

A chunk is complete once its record exists.  A worker killed at any instant loses only its chunks in
flight (data without a record is rewritten), so rerunning it alone (``--shard r/W``) or restarting
the whole job, with any W, completes the store with nothing lost or duplicated.  On a local disk
rank 0 holds the builder's ``.build.lock`` and worker r holds ``.build.lock.r``; an object store has
no locks, and the single metadata writer is the guarantee (see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import cache_runner as runner
from pipeline import paths
from pipeline.errors import SourceError, StoreError, UserError
from pipeline.store import read_attrs
from pipeline.store_layout import (
    LOCK_FILE,
    MANIFEST_KEY,
    STATUS_COMPLETE,
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
from pipeline.store_writer import FLUSH_OVERHEAD, BackgroundWriter, Chunk, Layout, StoreWriter, chunk_sums

RECORDS = "done"  # folder of per-chunk records while a distributed build runs
_RECORD_NAME = re.compile(r"^(\d{8})\.json$")  # not a writer's temporary file
TIMEOUT_S = float(os.environ.get("TSAE_DIST_TIMEOUT_S", 7 * 24 * 3600))  # a fast rank waits for slow ones


def record_key(chunk: int) -> str:
    return f"{RECORDS}/{chunk:08d}.json"


@dataclass
class DistributedResult(runner.BuildResult):
    """A `BuildResult` seen by one worker; ``complete`` is False after a share whose peers are not done."""

    complete: bool = True
    rank: int = 0
    world_size: int = 1
    missing_chunks: list[int] = field(default_factory=list)


class PeerFailed(UserError):
    """Another worker failed; rank 0 reports why, the others exit quietly with this."""

    exit_code = 1


# --------------------------------------------------------------------------------- the collectives
class Comm:
    """Rank, world size and the two collectives the protocol needs (gloo under torchrun).

    Standalone (one process running share r of W, or a plain build), the collectives are trivial.
    """

    def __init__(self, rank: int, world_size: int, group: bool = False):
        if not 0 <= rank < world_size:
            raise UserError(f"--shard needs 0 <= R < W, got {rank}/{world_size}")
        self.rank, self.world_size, self.group = rank, world_size, group

    @classmethod
    def from_env(cls) -> Comm:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1)
        import torch.distributed as dist

        if not dist.is_initialized():
            import datetime

            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.group:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.group:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/2"`` -> (1, 2)."""
    if not text:
        return None
    try:
        r, w = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like R/W (e.g. 1/2), got {text!r}") from None
    Comm(r, w)  # validates
    return r, w


# ------------------------------------------------------------------------------------- the records
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
    import json

    added = 0
    while stop is None or manifest.completed_chunks < stop:
        c = manifest.completed_chunks
        raw = read_key(store, record_key(c))
        if raw is None:
            break
        rec = json.loads(raw)
        if rec["chunk"] != c or not 0 < rec["n_seq"] <= manifest.chunk_seqs:
            raise StoreError(f"record {record_key(c)} does not describe chunk {c}; remove it and rerun")
        for name, digest in rec["checksums"].items():
            manifest.checksums.setdefault(name, []).append(digest)
        for h, s in rec["sums"].items():
            manifest.sums[h] = manifest.sums[h] + StatSums.from_json(s)
        manifest.completed_chunks += 1
        manifest.n_seq = c * manifest.chunk_seqs + rec["n_seq"]
        added += 1
    return added


# -------------------------------------------------------------------------------- one worker's writer
class ShareWriter:
    """Writes one worker's chunks straight into the preallocated arrays, then each chunk's record.

    On rank 0 it also folds finished records into ``manifest.json`` as they appear (progress for
    ``ls`` and a resumable prefix for a plain build).  It has StoreWriter's ``write``/``flush``, so a
    `BackgroundWriter` runs it on its own thread behind a queue.
    """

    def __init__(self, group, hooks: list[str], rank: int, world_size: int, manifest: Manifest | None):
        self.group, self.store = group, group.store
        self.rank, self.world_size = rank, world_size
        self.manifest = manifest  # rank 0 only
        self._arrays = {name: group[name] for name in array_names(hooks)}
        self._capacity = next(iter(self._arrays.values())).shape[0]
        self._chunk_seqs = int(group.attrs["chunk_seqs"])
        self._dirty = False
        self._last_flush, self._flush_cost = time.perf_counter(), 0.0

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
        if self.manifest is not None:
            self._dirty |= fold(self.manifest, self.store) > 0
            self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Rank 0: replace manifest.json when chunks were folded since (throttled like StoreWriter's)."""
        now = time.perf_counter()
        if self.manifest is None or not self._dirty:
            return
        if not force and now - self._last_flush < self._flush_cost / FLUSH_OVERHEAD:
            return
        write_key(self.store, MANIFEST_KEY, self.manifest.to_bytes())
        self._last_flush = time.perf_counter()
        self._flush_cost, self._dirty = self._last_flush - now, False


# -------------------------------------------------------------------------------------- the build
def build_distributed(cfg, *, model=None, shard: tuple[int, int] | None = None) -> DistributedResult:
    """Run this process's share of the build of ``cfg`` (a `CacheConfig`).

    Under torchrun the rank and world size come from the environment and the ranks synchronise with
    gloo; ``shard=(r, W)`` runs share r of W alone, with no collectives (rank 0 may create the store,
    ranks > 0 need it to exist); outside a launcher and without ``shard`` it is the whole job as
    rank 0 of 1.  Rank 0 finishes the store once every chunk is recorded.
    """
    comm = Comm(*shard) if shard else Comm.from_env()
    try:
        return _build(cfg, model, comm)
    finally:
        comm.close()


def _build(cfg, model, comm: Comm) -> DistributedResult:
    t0 = time.perf_counter()
    cfg = _device_for_rank(cfg)
    try:
        p = runner.plan(cfg, model)
    except runner._NeedModel:
        model = runner._load(cfg)
        p = runner.plan(cfg, model)
    attrs = read_attrs(p.location)
    if attrs is not None and attrs.get("status") == STATUS_COMPLETE:
        return _result(p, attrs, t0, comm, hit=True)
    if comm.rank > 0 and not comm.group and attrs is None:
        raise StoreError(
            f"store {p.key} does not exist yet: its rank 0 creates it (run the whole job, or "
            f"--shard 0/{comm.world_size} first)"
        )
    model = model if model is not None else runner._load(cfg)
    runner._check_model(cfg, model, p.hooks)

    # 1. rank 0 alone creates or resumes the store; the others wait for its word
    writer, error = None, None
    if comm.rank == 0:
        try:
            writer = _open_store(cfg, model, p, comm.world_size)
        except UserError as e:
            error = e
    failed = comm.broadcast(None if error is None else f"{error}")
    if error is not None:
        raise error
    if failed is not None:
        raise PeerFailed(f"rank 0 could not open the store: {failed}")

    # 2. every rank computes its share
    try:
        outcome = _run_share(cfg, model, p, comm, writer)
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    outcomes = comm.gather(outcome)

    # 3. rank 0 folds the records and, when every chunk is recorded, finishes the store
    summary = None
    if writer is not None:
        try:
            summary = _finish(writer, outcomes, t0)
        except UserError as e:
            summary = {"error": str(e)}
        finally:
            writer.close()
    if comm.group:
        summary = comm.broadcast(summary)
    if summary is None:  # a share alone, rank > 0: it cannot finish the store
        summary = _share_summary(p, outcomes)
    if "error" in summary:
        if comm.rank == 0 or not comm.group:
            raise StoreError(summary["error"])
        raise PeerFailed(summary["error"])
    r = _result(p, summary["attrs"], t0, comm, hit=False)
    r.complete, r.missing_chunks = summary["complete"], summary["missing"]
    r.resumed_seqs = sum(o["resumed_seqs"] for o in outcomes)
    r.computed_tokens = sum(o["computed_tokens"] for o in outcomes)
    return r


def _device_for_rank(cfg):
    """``--device auto`` on a machine with GPUs: worker with LOCAL_RANK k takes GPU k (mod count)."""
    if cfg.device != "auto":
        return cfg
    import torch

    if not torch.cuda.is_available():
        return cfg
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return dataclasses.replace(cfg, device=f"cuda:{local % torch.cuda.device_count()}")


def _open_store(cfg, model, p, world_size: int) -> StoreWriter:
    """Rank 0: create (preallocated) or resume the store; holds the builder's lock until closed."""
    from pipeline.sequences import iter_sequences
    from pipeline.sources import iter_documents

    runner.check_writable(paths.cache_home(cfg.cache_dir))
    existing = read_attrs(p.location)
    chunk_seqs, inner = (
        (existing["chunk_seqs"], existing["inner_seqs"]) if existing else (cfg.chunk_seqs, cfg.inner_seqs)
    )
    layout = Layout(p.hooks, cfg.ctx, model.d_model, cfg.store_dtype, chunk_seqs, inner)
    capacity = 0
    if existing is None or read_key(zarr_store(p.location, read_only=True), MANIFEST_KEY) is None:

        def seqs():
            docs = iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)
            return iter_sequences(docs, model.tokenizer, cfg.ctx, cfg.prepend_bos, cfg.max_tokens)

        head = list(itertools.islice(seqs(), chunk_seqs))
        if not head:
            raise SourceError(f"{cfg.dataset} ({cfg.split}) yields no sequence of ctx={cfg.ctx} tokens")
        runner._probe_shapes(model, np.asarray(head[0].tokens)[None, :2], p.hooks)
        if len(head) < chunk_seqs and (inner is None or len(head) % inner == 0):
            layout.chunk_seqs = capacity = len(head)  # the whole corpus in one chunk, as one process does
        else:
            capacity = _capacity(cfg, seqs, chunk_seqs)
    info = {"world_size": world_size, "partition": "chunk c -> worker c % world_size"}
    writer = StoreWriter.open(
        p.location,
        attrs={**runner._root_attrs(cfg, model, p), "distributed": info},
        layout=layout,
        batch_size=cfg.batch_size,
        capacity_seqs=capacity,
    )
    if writer.group.attrs.get("distributed") != info:
        writer.group.attrs.update({"distributed": info})
    return writer


def _capacity(cfg, seqs, chunk_seqs: int) -> int:
    """Sequences rank 0 preallocates.  The workers cannot grow the arrays, so every sequence of the
    corpus must fit; finish() trims the rest, and zarr enumerates every chunk it trims, so never more
    than the corpus gives: a bound of at most `PREALLOC_CHUNKS` chunks from ``max_tokens`` is taken
    as is (cheap to trim), beyond that a counting pass (tokeniser only, stops at ``max_tokens``)."""
    bound = -(-cfg.max_tokens // cfg.ctx) if cfg.max_tokens else None
    if bound is not None and bound <= runner.PREALLOC_CHUNKS * chunk_seqs:
        return bound
    return sum(1 for _ in seqs())


def _run_share(cfg, model, p, comm: Comm, writer: StoreWriter | None) -> dict:
    """Compute and write the chunks ``c % W == rank`` that are not recorded yet; a `UserError`
    becomes the outcome's ``error`` so every rank still reaches the gather."""
    import zarr

    from pipeline.sequences import SequenceStats, iter_sequences
    from pipeline.sources import iter_documents

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
        share = ShareWriter(group, p.hooks, rank, world, manifest if writer is not None else None)
        counters = SequenceStats()
        docs = iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)
        seqs = iter_sequences(docs, model.tokenizer, cfg.ctx, cfg.prepend_bos, cfg.max_tokens, counters)
        bar = _progress(cfg, p.key, rank, world)
        bg = BackgroundWriter(share)
        n_chunks = n_seq = 0
        t_share, cpu_share = time.perf_counter(), time.process_time()
        try:
            for index, tokens, doc_id, doc_offset in runner._prefetch(
                runner._chunk_stream(seqs, chunk_seqs, cfg.ctx)
            ):
                n_chunks, n_seq = index + 1, index * chunk_seqs + len(tokens)
                if index % world != rank:
                    continue
                if index in done:
                    outcome["resumed_seqs"] += len(tokens)
                    continue
                t = time.perf_counter()
                acts = runner._forward_chunk(model, tokens, p.hooks, batch_size, cfg.store_dtype)
                outcome["model_seconds"] += time.perf_counter() - t
                bg.put(Chunk(index, acts, tokens, doc_id, doc_offset))
                outcome["computed_tokens"] += tokens.size
                bar.update(tokens.size)
            bg.close()
        except BaseException:
            runner._stop(bg)
            raise
        finally:
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


def _finish(writer: StoreWriter, outcomes: list[dict], t0: float) -> dict:
    """Rank 0: fold every record; complete the store if all chunks are there, else say which are not."""
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        return {"error": "; ".join(errors) + "; recorded chunks are kept, rerun the same command to resume"}
    me = outcomes[0]
    m, store = writer.manifest, writer.group.store
    fold(m, store, stop=me["n_chunks"])
    write_key(store, MANIFEST_KEY, m.to_bytes())
    if m.completed_chunks < me["n_chunks"]:
        recorded = recorded_chunks(store)
        missing = [c for c in range(m.completed_chunks, me["n_chunks"]) if c not in recorded]
        return {"complete": False, "missing": missing, "attrs": dict(writer.group.attrs)}
    if m.n_seq != me["n_seq"]:
        return {"error": f"the records cover {m.n_seq} sequences, the corpus gives {me['n_seq']}"}
    attrs = writer.finish(
        {
            "sequences": me["sequences"],
            "build_seconds": round(time.perf_counter() - t0, 3),
            "model_seconds": round(sum(o["model_seconds"] for o in outcomes), 3),
            "writer_busy_seconds": round(sum(o["writer_busy_seconds"] for o in outcomes), 3),
            "share_seconds": [round(o["share_seconds"], 3) for o in outcomes],  # per rank, this run
            "share_cpu_seconds": [round(o["share_cpu_seconds"], 3) for o in outcomes],
        }
    )
    _remove_records(store)  # after status complete: a leftover record is harmless
    return {"complete": True, "missing": [], "attrs": attrs}


def _share_summary(p, outcomes: list[dict]) -> dict:
    """A share alone (rank > 0, no collectives): what is still missing after it."""
    o = outcomes[0]
    if "error" in o:
        return {"error": o["error"] + "; recorded chunks are kept, rerun the same command to resume"}
    store = zarr_store(p.location, read_only=True)
    manifest = Manifest.from_bytes(read_key(store, MANIFEST_KEY))
    recorded = recorded_chunks(store) | set(range(manifest.completed_chunks))
    missing = [c for c in range(o["n_chunks"]) if c not in recorded]
    return {"complete": False, "missing": missing, "attrs": read_attrs(p.location)}


def _remove_records(store) -> None:
    from zarr.core.sync import sync

    try:
        sync(store.delete_dir(RECORDS))
    except OSError:
        pass


def _result(p, attrs: dict, t0: float, comm: Comm, *, hit: bool) -> DistributedResult:
    n_seq = int(attrs.get("n_seq") or 0)
    return DistributedResult(
        p.key,
        str(p.location),
        hit,
        n_seq,
        n_seq * int(attrs["ctx"]),
        seconds=time.perf_counter() - t0,
        attrs=attrs,
        rank=comm.rank,
        world_size=comm.world_size,
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


# --------------------------------------------------------------------------------------- share locks
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


# ------------------------------------------------------------------------------------- the launcher
def already_built(cfg) -> bool:
    """True if the store of ``cfg`` is complete (then no worker need start); bad options raise the
    same one-line errors a build would, before anything is launched."""
    try:
        p = runner.plan(cfg)
    except runner._NeedModel:  # a hub model not in the local cache: the workers will see
        return False
    attrs = read_attrs(p.location)
    return attrs is not None and attrs.get("status") == STATUS_COMPLETE


def launch(workers: int, argv: list[str]) -> int:
    """``--workers N``: rerun this command under torchrun with N local workers; returns the exit code.

    The workers print their own errors; a worker that dies (e.g. killed) becomes one line here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args, skip = [], False
    for a in argv:  # drop --workers N / --workers=N
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            args.append(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={workers}", "-m", "pipeline.cli_cache", *args]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code is not None and code < 0:  # killed by a signal: not reported by the worker itself
            print(
                f"error: worker {rank} died (signal {-code}); recorded chunks are kept, rerun the "
                f"same command (or --shard {rank}/{workers}) to resume",
                file=sys.stderr,
            )
            return 1
        return code or 1
    return 0
