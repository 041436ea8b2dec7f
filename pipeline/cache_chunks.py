"""A build's unit of work, the chunk: tokens in (on a prefetch thread), activations out.

`tokenised_chunks` turns the source's documents into fixed-length sequences (`pipeline.sequences`,
deterministic order) grouped ``chunk_seqs`` at a time, tokenised on a background thread a few chunks
ahead of the model; `forward_chunk` runs one chunk through the model in batches that depend only on
the chunk, so a resumed build forms exactly the same batches (and numerics).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.errors import ModelError
from tsae.data.prefetch import prefetch

PREFETCH_CHUNKS = 2  # chunks tokenised ahead of the model


def tokenised_chunks(cfg, tokenizer, chunk_seqs: int, counters=None) -> Iterator[tuple]:
    """`chunk_stream` over ``cfg``'s source (a `CacheConfig`), run on the "cache-tokenise" thread;
    ``counters`` (a `SequenceStats`) counts what the sequence cutter kept and dropped."""
    return prefetched(chunk_stream(source_sequences(cfg, tokenizer, counters), chunk_seqs, cfg.ctx))


def source_sequences(cfg, tokenizer, counters=None) -> Iterator:
    """The build's sequences, in its deterministic order: ``cfg``'s source documents (dataset, split,
    text_column, config) cut by `pipeline.sequences` (ctx, prepend_bos, max_tokens)."""
    from pipeline.sequences import iter_sequences
    from pipeline.sources import iter_documents

    docs = iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)
    return iter_sequences(docs, tokenizer, cfg.ctx, cfg.prepend_bos, cfg.max_tokens, counters)


def prefetched(chunks: Iterable, depth: int = PREFETCH_CHUNKS) -> Iterator:
    """``chunks`` produced on the "cache-tokenise" thread (tokenising overlaps the model).
    Closing the generator (or an exception in the consumer) stops the thread."""
    return prefetch(chunks, depth, name="cache-tokenise")


def chunk_stream(seqs, chunk_seqs: int, ctx: int) -> Iterator[tuple]:
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


def forward_chunk(model, tokens: np.ndarray, hooks: list[str], batch_size: int, store_dtype: str) -> dict:
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


def probe_shapes(model, tokens: np.ndarray, hooks: list[str]) -> None:
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
