"""Documents -> fixed-length token sequences, the unit the activation cache stores.

Each document is tokenised on its own (`add_special_tokens=False`) and its token stream d_0 d_1 ...
is cut into consecutive, non-overlapping windows. Without BOS a sequence is ctx document tokens;
with BOS it is [BOS] + (ctx - 1) document tokens:

    sequence j of a document = [BOS]? + d[j*m : (j+1)*m],   m = ctx - 1 if prepend_bos else ctx
    doc_offset               = j*m   (index in the document's stream of its first document token)

so every position of a sequence sees only its own document: two documents are never glued into
one sequence. The tail of a document shorter than m tokens is dropped, and a document shorter than
one sequence gives none; both are counted in `SequenceStats`. With `max_tokens`, iteration stops
before the emitted total (ctx per sequence, BOS included) would exceed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import SourceError
from pipeline.sources import Document


@dataclass(frozen=True)
class Sequence:
    tokens: np.ndarray  # int32 [ctx]
    doc_id: int
    doc_offset: int


@dataclass
class SequenceStats:
    """Counters updated while `iter_sequences` runs; `as_dict()` goes into the store's metadata."""

    n_docs: int = 0  # documents tokenised
    n_docs_used: int = 0  # documents that gave at least one sequence
    n_docs_too_short: int = 0  # documents shorter than one sequence (all their tokens dropped)
    n_sequences: int = 0
    n_tokens: int = 0  # tokens emitted, BOS included (= n_sequences * ctx)
    n_doc_tokens: int = 0  # document tokens produced by the tokeniser
    n_short_doc_tokens_dropped: int = 0  # tokens of too-short documents
    n_tail_tokens_dropped: int = 0  # tokens after a document's last whole sequence
    longest_doc_tokens: int = 0
    hit_max_tokens: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def iter_sequences(
    docs: Iterable[Document],
    tokenizer,
    ctx: int,
    prepend_bos: bool,
    max_tokens: int | None = None,
    stats: SequenceStats | None = None,
) -> Iterator[Sequence]:
    """Stream `Sequence`s of exactly `ctx` int32 tokens from `docs` (see the module docstring).
    Pass a `SequenceStats` to read the counters during and after iteration. Raises `SourceError`
    when no document is long enough for one sequence."""
    stats = stats if stats is not None else SequenceStats()
    bos = _bos_id(tokenizer) if prepend_bos else None
    body = ctx - 1 if prepend_bos else ctx
    if body < 1:
        raise SourceError(f"ctx {ctx} is too small{' with a BOS token' if prepend_bos else ''}")
    if max_tokens is not None and max_tokens < ctx:
        raise SourceError(f"max_tokens {max_tokens} is smaller than one sequence of {ctx} tokens")
    for doc in docs:
        ids = np.asarray(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"], np.int32)
        stats.n_docs += 1
        stats.n_doc_tokens += len(ids)
        stats.longest_doc_tokens = max(stats.longest_doc_tokens, len(ids))
        n_seq = len(ids) // body
        if n_seq == 0:
            stats.n_docs_too_short += 1
            stats.n_short_doc_tokens_dropped += len(ids)
            continue
        stats.n_docs_used += 1
        stats.n_tail_tokens_dropped += len(ids) - n_seq * body
        for j in range(n_seq):
            if max_tokens is not None and stats.n_tokens + ctx > max_tokens:
                stats.hit_max_tokens = True
                return
            window = ids[j * body : (j + 1) * body]
            tokens = window if bos is None else np.concatenate([np.array([bos], np.int32), window])
            stats.n_sequences += 1
            stats.n_tokens += ctx
            yield Sequence(tokens=tokens, doc_id=doc.doc_id, doc_offset=j * body)
    if stats.n_sequences == 0:
        raise SourceError(
            f"every document is shorter than one sequence of {ctx} tokens "
            f"({stats.n_docs} documents, longest {stats.longest_doc_tokens} tokens); use a smaller --ctx"
        )


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise SourceError("this tokenizer has no BOS token; run without prepending BOS")
    return int(bos)
