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
rank 0 holds the builder's ``.build.lock`` and worker r holds ``.build.lock.r``; on S3 rank 0 holds
the builder's lease (`pipeline.store_lease`) and the shares have no locks (see docs/distributed.md).

This module runs the build: rank 0 creates (or resumes) the store, merges the records and finishes
it.  One worker's share and its records: `pipeline.distributed_share`; the collectives, ``--shard``
and the ``--workers`` launcher: `pipeline.distributed_launch`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import cache_runner as runner
from pipeline import paths
from pipeline.cache_attrs import root_attrs
from pipeline.cache_chunks import probe_shapes, source_sequences
from pipeline.cache_plan import NeedModel, check_model, plan
from pipeline.distributed_launch import Comm, PeerFailed, already_built, launch, parse_shard, under_launcher
from pipeline.distributed_share import RECORDS, fold, recorded_chunks, run_share
from pipeline.errors import SourceError, StoreError, UserError
from pipeline.store import read_attrs
from pipeline.store_layout import MANIFEST_KEY, STATUS_COMPLETE, Manifest, read_key, zarr_store
from pipeline.store_writer import Layout, StoreWriter

__all__ = [  # the CLI's and tests' names, wherever they live now
    "RECORDS",
    "Comm",
    "DistributedResult",
    "PeerFailed",
    "already_built",
    "build_distributed",
    "launch",
    "parse_shard",
    "under_launcher",
]


@dataclass
class DistributedResult(runner.BuildResult):
    """A `BuildResult` seen by one worker; ``complete`` is False after a share whose peers are not done."""

    complete: bool = True
    rank: int = 0
    world_size: int = 1
    missing_chunks: list[int] = field(default_factory=list)


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
        p = plan(cfg, model)
    except NeedModel:
        model = runner._load(cfg)
        p = plan(cfg, model)
    attrs = read_attrs(p.location)
    if attrs is not None and attrs.get("status") == STATUS_COMPLETE:
        return _result(p, attrs, t0, comm, hit=True)
    if comm.rank > 0 and not comm.group and attrs is None:
        raise StoreError(
            f"store {p.key} does not exist yet: its rank 0 creates it (run the whole job, or "
            f"--shard 0/{comm.world_size} first)"
        )
    model = model if model is not None else runner._load(cfg)
    check_model(cfg, model, p.hooks)

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
        outcome = run_share(cfg, model, p, comm, writer)
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
    runner.check_writable(paths.cache_home(cfg.cache_dir))
    existing = read_attrs(p.location)
    chunk_seqs, inner = (
        (existing["chunk_seqs"], existing["inner_seqs"]) if existing else (cfg.chunk_seqs, cfg.inner_seqs)
    )
    layout = Layout(p.hooks, cfg.ctx, model.d_model, cfg.store_dtype, chunk_seqs, inner)
    capacity = 0
    if existing is None or read_key(zarr_store(p.location, read_only=True), MANIFEST_KEY) is None:

        def seqs():
            return source_sequences(cfg, model.tokenizer)

        head = list(itertools.islice(seqs(), chunk_seqs))
        if not head:
            raise SourceError(f"{cfg.dataset} ({cfg.split}) yields no sequence of ctx={cfg.ctx} tokens")
        probe_shapes(model, np.asarray(head[0].tokens)[None, :2], p.hooks)
        if len(head) < chunk_seqs and (inner is None or len(head) % inner == 0):
            layout.chunk_seqs = capacity = len(head)  # the whole corpus in one chunk, as one process does
        else:
            capacity = _capacity(cfg, seqs, chunk_seqs)
    info = {"world_size": world_size, "partition": "chunk c -> worker c % world_size"}
    writer = StoreWriter.open(
        p.location,
        attrs={**root_attrs(cfg, model, p), "distributed": info},
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


def _finish(writer: StoreWriter, outcomes: list[dict], t0: float) -> dict:
    """Rank 0: fold every record; complete the store if all chunks are there, else say which are not."""
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        return {"error": "; ".join(errors) + "; recorded chunks are kept, rerun the same command to resume"}
    me = outcomes[0]
    m, store = writer.manifest, writer.group.store
    fold(m, store, stop=me["n_chunks"])
    writer.manifest_changed()  # written unconditionally, as the progress point a rerun resumes from
    writer.flush()  # lease checked first; an I/O error is one line
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
