"""The cache stage: text -> tokens -> model activations -> a resumable zarr store.

    result = build_cache(CacheConfig(model="smollm2-135m", layers=(15,), max_tokens=200_000))

Steps, in the order that keeps a repeat request free:

1. validate the options and compute the cache key (`pipeline.cache_key`) *without loading the model*;
   a complete store under that key is a cache hit: returned at once, no model work;
2. load the model, check layers/hooks and ctx against it;
3. stream documents -> fixed-length sequences (deterministic order) -> chunks of ``chunk_seqs``
   sequences, tokenised on a prefetch thread; a resumed build skips the sequences already written;
4. run each chunk through ``model.run_to_hooks`` (which stops after the deepest cached layer) in
   batches of ``batch_size`` *within the chunk*, so a resumed build forms exactly the same batches;
5. hand the chunk (already in the stored dtype) to the writer thread, which computes stats and
   checksums and writes it (`pipeline.store_writer`);
6. trim, record final stats and counters, mark the store complete.

Ctrl-C stops after the chunks already queued are written and leaves a resumable store.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import cache_key, paths
from pipeline.errors import ModelError, SourceError, StoreError, UserError
from pipeline.store import read_attrs
from pipeline.store_layout import FORMAT_TAG, FORMAT_VERSION, STATUS_COMPLETE, join
from pipeline.store_writer import BackgroundWriter, Chunk, Layout, StoreComplete, StoreWriter
from tsae.data.prefetch import prefetch

DEFAULT_MAX_TOKENS = 200_000  # the default build: a few minutes for SmolLM2 to layer 15 on 2 CPU cores
STORE_DTYPES = ("float16", "float32")  # zarr has no bfloat16; it is never stored
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MAX_CHUNK_BYTES = 4 * 2**30  # one hook's chunk; the default (64 x 128 x 576 x fp16) is 9.4 MB
PREALLOC_CHUNKS = 1024  # at most this many chunks are preallocated from max_tokens


class BuildInterrupted(UserError):
    """Ctrl-C during a build; the store is kept, resumable."""

    exit_code = 130


@dataclass
class CacheConfig:
    """Everything a build needs.  Fields marked *key* change the stored contents (see cache_key)."""

    model: str = "smollm2-135m"  # key
    layers: tuple[int, ...] | None = None  # key; None and no hooks: one middle layer
    hooks: tuple[str, ...] = ()  # key; explicit TransformerLens hook names, added to the layers
    dataset: str = "shakespeare"  # key
    split: str = "train"  # key
    text_column: str = "text"  # key
    config: str | None = None  # key (dataset configuration name)
    ctx: int = 128  # key
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # key; None: the whole corpus
    prepend_bos: bool = True  # key
    dtype: str = "float32"  # key: compute dtype
    store_dtype: str = "float16"  # key
    batch_size: int = 16
    chunk_seqs: int = 64  # sequences per chunk (the write/resume/verify unit)
    inner_seqs: int | None = None  # None: plain chunks; k: shards of chunk_seqs with inner chunks of k
    cache_dir: str | None = None
    device: str = "auto"
    progress: bool = True


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


# ------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What is known before any model work: hooks, key, location."""

    hooks: list[str]
    identity: dict
    fields: dict
    key: str
    location: str | Path


def _validate(cfg: CacheConfig) -> None:
    if cfg.store_dtype not in STORE_DTYPES:
        raise UserError(
            f"--store-dtype must be one of {', '.join(STORE_DTYPES)} (zarr cannot store bfloat16), "
            f"got {cfg.store_dtype!r}"
        )
    if cfg.dtype not in COMPUTE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {cfg.dtype!r}")
    for name in ("ctx", "batch_size", "chunk_seqs"):
        if int(getattr(cfg, name)) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.inner_seqs is not None and (cfg.inner_seqs < 1 or cfg.chunk_seqs % cfg.inner_seqs):
        raise UserError(f"inner_seqs must divide chunk_seqs={cfg.chunk_seqs}, got {cfg.inner_seqs}")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.ctx:
        raise UserError(f"max_tokens={cfg.max_tokens} is less than one sequence of ctx={cfg.ctx} tokens")
    if any(layer < 0 for layer in cfg.layers or ()):
        raise ModelError(f"layers must be >= 0, got {list(cfg.layers)}")


def _hooks(cfg: CacheConfig, n_layers: int | None) -> list[str] | None:
    """Hook names in canonical order (by block, then name); None if the default layer needs n_layers."""
    layers = list(cfg.layers or ())
    if not layers and not cfg.hooks:
        if n_layers is None:
            return None
        layers = cache_key.default_layers(n_layers)
    names = {f"blocks.{layer}.hook_resid_post" for layer in layers} | set(cfg.hooks)

    def order(h: str):
        parts = h.split(".")
        return (int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1, h)

    return sorted(names, key=order)


TOKENIZATION = {  # how pipeline.sequences cuts documents; bump "version" if that ever changes
    "scheme": "per-document windows: [BOS]? + next ctx-1 (or ctx) tokens; tails dropped; no packing",
    "add_special_tokens": False,
    "version": 1,
}


def plan(cfg: CacheConfig, model=None) -> Plan:
    """Hooks, key and store location for ``cfg``; loads nothing unless the model identity or the
    default layer cannot be known cheaply (a hub model not in the local cache) and no model is given."""
    from pipeline.sources import iter_documents, source_fingerprint

    _validate(cfg)
    identity = cache_key.model_identity(cfg.model, cfg.cache_dir)
    n_layers = model.n_layers if model is not None else cache_key.cheap_n_layers(cfg.model)
    hooks = _hooks(cfg, n_layers)
    if n_layers is not None and any(layer >= n_layers for layer in cfg.layers or ()):
        raise ModelError(
            f"layer {max(cfg.layers)} out of range: {cfg.model} has {n_layers} layers (0-{n_layers - 1})"
        )
    if (identity is None or hooks is None) and model is None:
        raise _NeedModel
    if identity is None:
        identity = {"spec": cfg.model, "weights_sha256": model.weights_hash}
    if hooks is None:
        hooks = _hooks(cfg, model.n_layers)
    iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)  # checks the source; reads nothing
    dataset = {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "text_column": cfg.text_column,
        "config": cfg.config,
        "fingerprint": source_fingerprint(cfg.dataset, cfg.split, cfg.text_column, cfg.config),
    }
    fields = cache_key.key_fields(
        model=identity,
        hooks=hooks,
        ctx=cfg.ctx,
        prepend_bos=cfg.prepend_bos,
        dtype=cfg.dtype,
        store_dtype=cfg.store_dtype,
        dataset=dataset,
        max_tokens=cfg.max_tokens,
        tokenization=TOKENIZATION,
    )
    key = cache_key.make_key(fields)
    return Plan(hooks, identity, fields, key, join(paths.cache_home(cfg.cache_dir), key))


class _NeedModel(Exception):
    """plan() needs the loaded model first."""


# ------------------------------------------------------------------------------------- the build
def build_cache(cfg: CacheConfig, *, model=None) -> BuildResult:
    """Build (or resume, or find) the store for ``cfg``; ``model`` may be a preloaded `LoadedModel`."""
    t0 = time.perf_counter()
    try:
        p = plan(cfg, model)
    except _NeedModel:
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
    _check_model(cfg, model, p.hooks)
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
    from pipeline.models import load_model

    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, cache_home=cfg.cache_dir)


def _check_model(cfg: CacheConfig, model, hooks: list[str]) -> None:
    model.resolve_hooks(hooks=hooks)  # raises ModelError for a layer out of range or an unknown hook
    if cfg.ctx > model.n_ctx:
        raise ModelError(f"ctx {cfg.ctx} exceeds {model.name}'s context length n_ctx={model.n_ctx}")
    chunk_bytes = cfg.chunk_seqs * cfg.ctx * model.d_model * np.dtype(cfg.store_dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:  # a chunk is held in memory (several, queued) while written
        raise UserError(
            f"--chunk-seqs {cfg.chunk_seqs} makes chunks of {chunk_bytes / 2**30:.1f} GiB per hook "
            f"(limit {MAX_CHUNK_BYTES // 2**30} GiB); use at most "
            f"{MAX_CHUNK_BYTES // (cfg.ctx * model.d_model * np.dtype(cfg.store_dtype).itemsize)}"
        )


def check_writable(home) -> None:
    """Raise StoreError unless the (local) cache home can hold new files."""
    if paths.is_url(home):
        return
    try:
        Path(home).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-test-"):
            pass
    except OSError as e:
        raise StoreError(f"cache dir {home} is not writable: {e.strerror or e}") from None


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformer-lens", "transformers", "zarr", "numpy", "tsae"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _root_attrs(cfg: CacheConfig, model, p: Plan) -> dict:
    tok = model.tokenizer
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "key": p.key,
        "key_fields": p.fields,
        "model": {
            "name": model.name,
            "spec": cfg.model,
            "weights_hash": model.weights_hash,
            "identity": p.identity,
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "n_ctx": model.n_ctx,
        },
        "hooks": p.hooks,
        "layers": [model.layer_of(h) for h in p.hooks],
        "ctx": cfg.ctx,
        "d_model": model.d_model,
        "prepend_bos": cfg.prepend_bos,
        "bos_token_id": model.bos_token_id,
        "dtype": cfg.dtype,
        "store_dtype": cfg.store_dtype,
        "dataset": p.fields["dataset"],
        "max_tokens": cfg.max_tokens,
        "tokenizer": {
            "name": getattr(tok, "name_or_path", None),
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        "versions": _versions(),
        "device": str(model.device),
        "batch_size": cfg.batch_size,
    }


def _build(cfg: CacheConfig, model, p: Plan, t0: float) -> BuildResult:
    from pipeline.sequences import SequenceStats, iter_sequences
    from pipeline.sources import iter_documents

    docs = iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)
    counters = SequenceStats()
    seqs = iter_sequences(docs, model.tokenizer, cfg.ctx, cfg.prepend_bos, cfg.max_tokens, counters)
    existing = read_attrs(p.location)  # a building store: resume it with its own chunk layout
    resuming = existing is not None
    chunk_seqs, inner = (
        (existing["chunk_seqs"], existing["inner_seqs"]) if resuming else (cfg.chunk_seqs, cfg.inner_seqs)
    )
    layout = Layout(p.hooks, cfg.ctx, model.d_model, cfg.store_dtype, chunk_seqs, inner)
    chunks = tokenised = _prefetch(_chunk_stream(seqs, layout.chunk_seqs, cfg.ctx))
    first = None
    if not resuming:  # never create a store for a corpus that yields nothing
        first = next(chunks, None)
        if first is None:
            raise SourceError(f"{cfg.dataset} ({cfg.split}) yields no sequence of ctx={cfg.ctx} tokens")
        _probe_shapes(model, first[1][:1, :2], p.hooks)  # two positions: cheap, shows the layout
        n = len(first[1])
        if n < layout.chunk_seqs and (inner is None or n % inner == 0):
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
            attrs=_root_attrs(cfg, model, p),
            layout=layout,
            batch_size=cfg.batch_size,
            capacity_seqs=capacity,
        )
    except StoreComplete:  # another process finished this key meanwhile: its store answers
        chunks.close()
        return _hit(p, read_attrs(p.location), t0)
    resumed = writer.n_seq
    if resuming:
        _remove_partial_writes(p.location)
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
            acts = _forward_chunk(model, tokens, p.hooks, batch_size, cfg.store_dtype)
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
        _stop(bg)
        raise BuildInterrupted(
            f"interrupted: {writer.n_seq} sequences ({writer.manifest.completed_chunks} "
            f"chunks) are kept in {p.location}; rerun the same command to resume"
        ) from None
    except BaseException:
        _stop(bg)
        raise
    finally:
        tokenised.close()  # stop and join the tokeniser thread now, not when the frame is collected
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


def _remove_partial_writes(location) -> None:
    """Delete the temporary files (``*.partial``) that zarr's atomic writes leave when the process
    is killed mid-write; this build holds the store's lock, so no other writer owns one."""
    if isinstance(location, Path):
        for path in location.rglob("*.partial"):
            path.unlink(missing_ok=True)


def _forward_chunk(model, tokens: np.ndarray, hooks: list[str], batch_size: int, store_dtype: str) -> dict:
    """{hook: [n, ctx, d] in the stored dtype} for one chunk, in batches that depend only on the chunk
    (so a resumed build forms the same batches); the dtype conversion happens on the model's device."""
    import torch

    n, ctx = tokens.shape
    acts = {h: np.empty((n, ctx, model.d_model), dtype=store_dtype) for h in hooks}
    for b in range(0, n, batch_size):
        out = model.run_to_hooks(torch.from_numpy(tokens[b : b + batch_size]), hooks)
        for h in hooks:
            acts[h][b : b + batch_size] = out[h].to(getattr(torch, store_dtype)).cpu().numpy()
    return acts


def _probe_shapes(model, tokens: np.ndarray, hooks: list[str]) -> None:
    """Refuse, before any store exists, a hook whose activations are not [batch, ctx, d_model].
    Residual-stream hooks always are, so a plain --layers build skips this extra forward."""
    import torch

    hooks = [h for h in hooks if not h.endswith(".hook_resid_post")]
    for h, a in (model.run_to_hooks(torch.from_numpy(tokens), hooks) if hooks else {}).items():
        if tuple(a.shape) != (*tokens.shape, model.d_model):
            raise ModelError(
                f"hook {h} gives activations of shape {tuple(a.shape)}; a store holds "
                f"[seq, pos, d_model={model.d_model}] hooks only (resid, attn_out, mlp_out, ...)"
            )


def _stop(bg: BackgroundWriter) -> None:
    """Let the writer finish what is queued (a failure there was already reported or is secondary)."""
    try:
        bg.close()
    except BaseException:
        pass


def _chunk_stream(seqs, chunk_seqs: int, ctx: int) -> Iterator[tuple]:
    """(chunk index, int32 tokens [n, ctx], int64 doc_id [n], int64 doc_offset [n]) per chunk."""
    for index in itertools.count():
        group = list(itertools.islice(seqs, chunk_seqs))
        if not group:
            return
        tokens = np.stack([np.asarray(s.tokens, dtype=np.int32) for s in group])
        yield (
            index,
            tokens,
            np.array([s.doc_id for s in group], dtype=np.int64),
            np.array([s.doc_offset for s in group], dtype=np.int64),
        )


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` on a daemon thread ``depth`` items ahead (tokenising overlaps the model).
    Closing the generator (or an exception in the consumer) stops the thread."""
    return prefetch(it, depth, name="cache-tokenise")


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
