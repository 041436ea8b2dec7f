"""The cache stage: text -> tokens -> model activations -> a resumable zarr store.

    result = build_cache(CacheConfig(model="smollm2-135m", layers=(15,), max_tokens=200_000))

Steps, in the order that keeps a repeat request free:

1. validate the options and compute the cache key *without loading the model*
   (`pipeline.cache_plan`); a complete store under that key is a cache hit: returned at once, no
   model work;
2. load the model, check layers/hooks and ctx against it;
3. stream documents -> fixed-length sequences (deterministic order) -> chunks of ``chunk_seqs``
   sequences, tokenised on a prefetch thread (`pipeline.cache_chunks`); a resumed build skips the
   sequences already written;
4. run each chunk through ``model.run_to_hooks`` (which stops after the deepest cached layer) in
   batches of ``batch_size`` *within the chunk*, so a resumed build forms exactly the same batches;
5. hand the chunk (already in the stored dtype) to the writer thread, which computes stats and
   checksums and writes it (`pipeline.store_writer`);
6. trim, record final stats and counters, mark the store complete.

Ctrl-C stops after the chunks already queued are written and leaves a resumable store.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import paths
from pipeline.cache_attrs import root_attrs
from pipeline.cache_chunks import forward_chunk, probe_shapes, tokenised_chunks
from pipeline.cache_plan import CacheConfig, NeedModel, Plan, check_model, plan
from pipeline.errors import SourceError, StoreError, UserError
from pipeline.store import read_attrs
from pipeline.store_layout import STATUS_COMPLETE
from pipeline.store_writer import BackgroundWriter, Chunk, Layout, StoreComplete, StoreWriter

PREALLOC_CHUNKS = 1024  # at most this many chunks are preallocated from max_tokens


class BuildInterrupted(UserError):
    """Ctrl-C during a build; the store is kept, resumable."""

    exit_code = 130


@dataclass
class BuildResult:
    key: str
    location: str
    hit: bool  # True: an existing complete store answered, nothing was computed
    n_seq: int
    n_tokens: int
    resumed_seqs: int = 0  # sequences already in the store when this run started
    computed_tokens: int = 0  # tokens run through the model by this run
    seconds: float = 0.0
    attrs: dict = field(default_factory=dict, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.computed_tokens / self.seconds if self.seconds else 0.0


def build_cache(cfg: CacheConfig, *, model=None) -> BuildResult:
    """Build (or resume, or find) the store for ``cfg``; ``model`` may be a preloaded `LoadedModel`."""
    t0 = time.perf_counter()
    try:
        p = plan(cfg, model)
    except NeedModel:
        model = _load(cfg)
        p = plan(cfg, model)
    attrs = read_attrs(p.location)
    if attrs is not None and attrs.get("status") == STATUS_COMPLETE:
        return _hit(p, attrs, t0)
    if attrs is not None and "distributed" in attrs:  # started by workers: finish it as a job of one
        from pipeline.distributed_cache import build_distributed

        return build_distributed(cfg, model=model, shard=(0, 1))
    check_writable(paths.cache_home(cfg.cache_dir))
    model = model if model is not None else _load(cfg)
    check_model(cfg, model, p.hooks)
    return _build(cfg, model, p, t0)


def _hit(p: Plan, attrs: dict, t0: float) -> BuildResult:
    return BuildResult(
        p.key,
        str(p.location),
        True,
        attrs["n_seq"],
        attrs["n_seq"] * attrs["ctx"],
        seconds=time.perf_counter() - t0,
        attrs=attrs,
    )


def _load(cfg: CacheConfig):
    from pipeline.models import load_model  # looked up per call: tests substitute pipeline.models.load_model

    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, cache_home=cfg.cache_dir)


def check_writable(home) -> None:
    """Raise StoreError unless the (local) cache home can hold new files."""
    if paths.is_url(home):
        return
    if Path(home).exists() and not Path(home).is_dir():
        raise StoreError(f"cache dir {home} is a file, not a directory")
    try:
        Path(home).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-test-"):
            pass
    except OSError as e:
        raise StoreError(f"cache dir {home} is not writable: {e.strerror or e}") from None


def _build(cfg: CacheConfig, model, p: Plan, t0: float) -> BuildResult:
    from pipeline.sequences import SequenceStats

    existing = read_attrs(p.location)  # a building store: resume it with its own chunk layout
    resuming = existing is not None
    chunk_seqs, inner = (
        (existing["chunk_seqs"], existing["inner_seqs"]) if resuming else (cfg.chunk_seqs, cfg.inner_seqs)
    )
    layout = Layout(p.hooks, cfg.ctx, model.d_model, cfg.store_dtype, chunk_seqs, inner)
    counters = SequenceStats()
    chunks = tokenised_chunks(cfg, model.tokenizer, layout.chunk_seqs, counters)
    try:
        return _fill(cfg, model, p, t0, layout, chunks, counters, resuming)
    finally:
        chunks.close()  # stop and join the tokeniser thread now, whichever way the build ends


def _fill(cfg: CacheConfig, model, p: Plan, t0: float, layout: Layout, chunks, counters, resuming: bool):
    """Open (or resume) the store and write every chunk of ``chunks`` not in it yet."""
    first = None
    if not resuming:  # never create a store for a corpus that yields nothing
        first = next(chunks, None)
        if first is None:
            raise SourceError(f"{cfg.dataset} ({cfg.split}) yields no sequence of ctx={cfg.ctx} tokens")
        probe_shapes(model, first[1][:1, :2], p.hooks)  # two positions: cheap, shows the layout
        n = len(first[1])
        if n < layout.chunk_seqs and (layout.inner_seqs is None or n % layout.inner_seqs == 0):
            layout.chunk_seqs = n  # the whole corpus fits in one chunk: no larger than its data
    # preallocate from max_tokens, but at most PREALLOC_CHUNKS chunks (the writer doubles beyond):
    # finish() trims to n_seq, and zarr enumerates every chunk it trims away, so preallocating
    # --max-tokens 1e9 over a small corpus cost minutes and GBs of memory at the end
    capacity = (
        min(-(-cfg.max_tokens // cfg.ctx), PREALLOC_CHUNKS * layout.chunk_seqs)
        if cfg.max_tokens
        else 16 * cfg.chunk_seqs
    )
    try:
        writer = StoreWriter.open(
            p.location,
            attrs=root_attrs(cfg, model, p),
            layout=layout,
            batch_size=cfg.batch_size,
            capacity_seqs=capacity,
        )
    except StoreComplete:  # another process finished this key meanwhile: its store answers
        return _hit(p, read_attrs(p.location), t0)
    resumed = writer.n_seq
    if resuming:
        remove_partial_writes(p.location)
    batch_size = writer.manifest.batch_size  # a resumed build keeps its batches (same numerics)
    if first is not None:
        chunks = itertools.chain([first], chunks)
    # skip exactly the chunks already written (another process may have started the store after
    # this one looked, so this holds for a fresh start too)
    chunks = itertools.islice(chunks, writer.manifest.completed_chunks, None)
    bar = _progress(cfg, p.key, resumed)
    computed, model_s = 0, 0.0
    bg = BackgroundWriter(writer)
    try:
        for index, tokens, doc_id, doc_offset in chunks:
            t = time.perf_counter()
            acts = forward_chunk(model, tokens, p.hooks, batch_size, cfg.store_dtype)
            model_s += time.perf_counter() - t
            bg.put(Chunk(index, acts, tokens, doc_id, doc_offset))
            computed += tokens.size
            bar.update(tokens.size)
        bg.close()
        final = writer.finish(
            {
                "sequences": counters.as_dict(),
                "build_seconds": round(time.perf_counter() - t0, 3),
                "model_seconds": round(model_s, 3),  # forward passes + dtype conversion, this run
                "writer_busy_seconds": round(bg.busy_s, 3),
            }
        )
    except KeyboardInterrupt:
        bg.close_after_error()
        raise BuildInterrupted(
            f"interrupted: {writer.n_seq} sequences ({writer.manifest.completed_chunks} "
            f"chunks) are kept in {p.location}; rerun the same command to resume"
        ) from None
    except BaseException:
        bg.close_after_error()
        raise
    finally:
        bar.close()
        writer.close()
    return BuildResult(
        p.key,
        str(p.location),
        False,
        final["n_seq"],
        final["n_seq"] * cfg.ctx,
        resumed,
        computed,
        time.perf_counter() - t0,
        final,
    )


def remove_partial_writes(location) -> None:
    """Delete the temporary files (``*.partial``) that zarr's atomic writes leave when the process
    is killed mid-write; this build holds the store's lock, so no other writer owns one."""
    if isinstance(location, Path):
        for path in location.rglob("*.partial"):
            path.unlink(missing_ok=True)


def _progress(cfg: CacheConfig, key: str, resumed_seqs: int):
    from tqdm.auto import tqdm

    total = (cfg.max_tokens // cfg.ctx) * cfg.ctx if cfg.max_tokens else None
    return tqdm(
        total=total,
        initial=resumed_seqs * cfg.ctx,
        unit="tok",
        unit_scale=True,
        desc=key[:40],
        disable=not cfg.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )

