"""Batches of windows of consecutive positions, read chunk by chunk from a sequence store.

A temporal SAE trains on *windows*: `w` consecutive positions of one sequence.  The source is any
array-like `acts [n_seq, ctx, d]` (numpy, memmap, zarr) and optionally `tokens [n_seq, ctx]`.

Windows of one sequence tile it: starts 0, w, 2w, ... .  When `ctx % w != 0` the remaining
`ctx % w` positions are covered by one extra window aligned to the end (start `ctx - w`), which
overlaps the previous window; so every position is seen at least once per epoch and none is
silently dropped (`tail="drop"` drops the remainder instead, explicitly).  `skip=s` tiles
positions [s, ctx) instead (e.g. s = 1 leaves out a BOS position, whose residual is an outlier).

Order of one epoch, fully determined by `(seed, epoch)` and independent of the data:

    1. the *read units* (chunks of `chunk_seqs` sequences, the store's chunk or shard along the
       sequence axis) holding at least one selected sequence are shuffled;
    2. they are taken `buffer_chunks` at a time; a buffer is read (whole chunks: the fast path for
       zarr) and its windows (seq, start) are shuffled together, which mixes sequences;
    3. the stream of windows, buffer after buffer and epoch after epoch, is cut into batches of
       `batch_size`.  Only the very last batch of the stream can be partial (kept unless
       `drop_last`).  Positions inside a window are never shuffled.

Because the plan is index-only, `start_batch=n` skips n batches without reading their data: a
trainer resumed from a checkpoint re-creates the loader with the same seed and fast-forwards.

Data-parallel shares: with `rank=r, world_size=W` the plan and the batches are those of one process
(`batch_size` is the *global* batch), and rank r yields rows [r n // W, (r+1) n // W) of each batch
of n windows, so the W shares of a step concatenate to exactly the 1-process batch.  Every rank
reads the chunks of every buffer (a buffer's windows are shuffled across its sequences, so each
rank needs nearly all of them) and gathers only its own rows.  A last partial batch smaller than W
is dropped (a share may not be empty); `len`, `batches_yielded` and `start_batch` count global
batches.

A background thread (`tsae.data.prefetch`) reads chunks and assembles batches into a bounded
queue (`prefetch` batches); the next buffer's chunks are read while the current one is being
served.  At most about 2 x `buffer_chunks` chunks are in memory.  `wait_s` accumulates the time
the consumer spent blocked on the queue (the loader's share of a training step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tsae.data.prefetch import prefetch


@dataclass
class WindowBatch:
    acts: Tensor  # float32 [B, w, d]
    tokens: Tensor | None  # [B, w] (int), or None when the loader has no tokens
    seq: Tensor  # long [B]: sequence index in the source array
    start: Tensor  # long [B]: first position of the window in its sequence

    def __len__(self) -> int:
        return self.acts.shape[0]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> WindowBatch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return WindowBatch(mv(self.acts), mv(self.tokens), mv(self.seq), mv(self.start))


def window_starts(ctx: int, window: int, tail: str = "align_end", skip: int = 0) -> np.ndarray:
    """Start positions of the windows cutting positions [skip, ctx) of a sequence (see module doc)."""
    n = ctx - skip
    if not 1 <= window <= n:
        raise ValueError(f"window must be in [1, ctx - skip = {n}], got {window}")
    if tail not in ("align_end", "drop"):
        raise ValueError(f"tail must be 'align_end' or 'drop', got {tail!r}")
    starts = list(range(0, n - window + 1, window))
    if n % window and tail == "align_end":
        starts.append(n - window)
    return np.asarray(starts, dtype=np.int64) + skip


def detect_chunk_seqs(acts) -> int:
    """Sequences per read unit: the zarr shard (or chunk) along axis 0; 64 for plain arrays."""
    for attr in ("shards", "chunks"):
        shape = getattr(acts, attr, None)
        if isinstance(shape, tuple) and shape:
            return int(shape[0])
    return 64


class WindowBatches:
    """Iterable of `WindowBatch`es over windows of consecutive positions (see module doc).

    epochs: passes over the data; None means 1 when `n_tokens` is None, else unbounded.
    n_tokens: stop once this many tokens (windows x w) were yielded; the last batch is cut short
        to ceil(remaining / w) windows.
    start_batch: skip this many batches of the stream (index-only, no reads): resume.
    rank, world_size: yield only this rank's share of every batch (see module doc).
    decode: optional function applied to each block read from `acts` (e.g. bf16 bits -> float).
    """

    def __init__(
        self,
        acts,
        tokens=None,
        *,
        window: int,
        batch_size: int,
        seed: int = 0,
        seq_indices: Sequence[int] | np.ndarray | None = None,
        chunk_seqs: int | None = None,
        prefetch: int = 2,
        epochs: int | None = None,
        n_tokens: int | None = None,
        drop_last: bool = False,
        buffer_chunks: int = 4,
        device: str | torch.device = "cpu",
        start_batch: int = 0,
        tail: str = "align_end",
        skip: int = 0,
        decode: Callable[[np.ndarray], np.ndarray] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if len(acts.shape) != 3:
            raise ValueError(f"acts must be [n_seq, ctx, d], got shape {tuple(acts.shape)}")
        self.acts, self.tokens = acts, tokens
        self.n_seq, self.ctx, self.d = (int(s) for s in acts.shape)
        if tokens is not None and tuple(tokens.shape) != (self.n_seq, self.ctx):
            raise ValueError(f"tokens shape {tuple(tokens.shape)} != {(self.n_seq, self.ctx)}")
        if batch_size < 1 or buffer_chunks < 1 or prefetch < 1:
            raise ValueError("batch_size, buffer_chunks and prefetch must be >= 1")
        if not 0 <= rank < world_size or batch_size < world_size:
            raise ValueError(f"need 0 <= rank < world_size <= batch_size, got rank {rank}, world_size "
                             f"{world_size}, batch_size {batch_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.window, self.batch_size, self.seed = int(window), int(batch_size), int(seed)
        self.starts = window_starts(self.ctx, self.window, tail, skip)
        self.skip = int(skip)
        if seq_indices is None:
            self.seq_indices = np.arange(self.n_seq, dtype=np.int64)
        else:
            sel = np.unique(np.asarray(seq_indices, dtype=np.int64))
            if len(sel) != len(seq_indices):
                raise ValueError("seq_indices has duplicates")
            if len(sel) and (sel[0] < 0 or sel[-1] >= self.n_seq):
                raise ValueError(f"seq_indices out of range [0, {self.n_seq})")
            self.seq_indices = sel
        if len(self.seq_indices) == 0:
            raise ValueError("no sequences selected")
        self.chunk_seqs = int(chunk_seqs or detect_chunk_seqs(acts))
        self.prefetch, self.buffer_chunks = int(prefetch), int(buffer_chunks)
        self.epochs = epochs if epochs is not None else (1 if n_tokens is None else None)
        self.n_tokens = n_tokens
        self.drop_last, self.device, self.start_batch = drop_last, torch.device(device), int(start_batch)
        self.decode = decode
        # read units: chunk id -> the selected sequences it holds
        chunk_of = self.seq_indices // self.chunk_seqs
        self._units, first = np.unique(chunk_of, return_index=True)
        self._unit_seqs = np.split(self.seq_indices, first[1:])
        self.wait_s = 0.0  # time the consumer spent blocked on the loader
        self.batches_yielded = 0

    def restart(self, start_batch: int) -> WindowBatches:
        """The same stream (same arguments and seed) starting at batch `start_batch`: resume."""
        return WindowBatches(**{**self._args, "start_batch": int(start_batch)})

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def windows_per_epoch(self) -> int:
        return len(self.seq_indices) * len(self.starts)

    @property
    def tokens_per_epoch(self) -> int:
        return self.windows_per_epoch * self.window

    def _total_windows(self) -> int | None:
        caps = []
        if self.epochs is not None:
            caps.append(self.epochs * self.windows_per_epoch)
        if self.n_tokens is not None:
            caps.append(math.ceil(self.n_tokens / self.window))
        return min(caps) if caps else None

    def __len__(self) -> int:
        total = self._total_windows()
        if total is None:
            raise TypeError("unbounded WindowBatches (epochs=None, n_tokens=None) has no length")
        full, last = divmod(total, self.batch_size)  # a partial last batch needs a row per rank
        n = full + int(last > 0 and last >= self.world_size and not self.drop_last)
        return max(n - self.start_batch, 0)

    def sample_sequences(self, max_seqs: int = 256) -> np.ndarray:
        """Up to `max_seqs` selected sequences [n, ctx - skip, d] (float32, positions >= skip), read
        as whole units spread evenly over the selection (for input statistics and b_dec init)."""
        picks = np.unique(np.linspace(0, len(self._units) - 1, min(len(self._units), 8)).astype(int))
        out, n = [], 0
        for u in picks:
            a = self._read_unit(int(u))[0]
            rows = self._unit_seqs[u] - self._unit_seqs[u][0]
            out.append(np.asarray(a[rows][: max_seqs - n, self.skip :], dtype=np.float32))
            n += len(out[-1])
            if n >= max_seqs:
                break
        return np.concatenate(out)

    # ---- the index-only plan -----------------------------------------------------------------
    def _plan(self) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yields (unit ids to read, windows [n, 2] of (seq, start)) per buffer, forever or per epochs."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            order = rng.permutation(len(self._units))
            for i in range(0, len(order), self.buffer_chunks):
                group = order[i : i + self.buffer_chunks].tolist()
                seqs = np.concatenate([self._unit_seqs[u] for u in group])
                win = np.stack(np.meshgrid(seqs, self.starts, indexing="ij"), -1).reshape(-1, 2)
                yield group, win[rng.permutation(len(win))]
            epoch += 1

    # ---- reading -----------------------------------------------------------------------------
    def _read_unit(self, u: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        seqs = self._unit_seqs[u]
        lo, hi = int(seqs[0]), int(seqs[-1]) + 1  # one contiguous read inside the chunk
        a = np.asarray(self.acts[lo:hi])
        if self.decode is not None:
            a = self.decode(a)
        t = None if self.tokens is None else np.asarray(self.tokens[lo:hi])
        return a, t, lo

    def _batches(self) -> Iterator[WindowBatch]:
        """The stream of batches (run on the prefetch thread by `__iter__`)."""
        total = self._total_windows()
        to_skip = self.start_batch * self.batch_size  # windows of the stream to skip
        emitted = 0  # windows of the stream passed (skipped or yielded)
        plan = self._plan()
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending: list[tuple[list[Future], np.ndarray]] = []

            def schedule_next() -> None:
                nonlocal emitted
                for group, win in plan:
                    n = len(win)
                    if total is not None:
                        n = min(n, total - emitted)
                    if emitted + n <= to_skip:  # entirely skipped: never read
                        emitted += n
                        if total is not None and emitted >= total:
                            return
                        continue
                    cut = max(to_skip - emitted, 0)
                    futs = [pool.submit(self._read_unit, u) for u in group]
                    pending.append((futs, win[cut:n]))
                    emitted += n
                    return

            schedule_next()
            carry: list[tuple[dict, np.ndarray]] = []  # (buffer, windows) not yet batched
            n_carry = 0
            while pending:
                futs, win = pending.pop(0)
                if total is None or emitted < total:
                    schedule_next()  # read ahead while this buffer is served
                buf = self._assemble_buffer([f.result() for f in futs])
                carry.append((buf, win))
                n_carry += len(win)
                while n_carry >= self.batch_size:
                    batch, carry, n_carry = self._take(carry, n_carry, self.batch_size)
                    yield batch
            if n_carry and not self.drop_last and n_carry >= self.world_size:
                batch, carry, n_carry = self._take(carry, n_carry, n_carry)
                yield batch

    def _assemble_buffer(self, parts: list[tuple[np.ndarray, np.ndarray | None, int]]) -> dict:
        acts = np.concatenate([p[0] for p in parts])
        toks = None if self.tokens is None else np.concatenate([p[1] for p in parts])
        row_of = np.full(self.n_seq, -1, dtype=np.int64)  # global seq -> row in buffer
        r = 0
        for a, _, lo in parts:
            row_of[lo : lo + len(a)] = np.arange(r, r + len(a))
            r += len(a)
        return {"acts": acts, "tokens": toks, "row_of": row_of}

    def _take(self, carry, n_carry: int, n: int):
        """Pop the first n windows of `carry` (one batch) into a WindowBatch of this rank's share."""
        pieces_a, pieces_t, seqs, starts = [], [], [], []
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        need, done = n, 0
        while need:
            buf, win = carry[0]
            part, rest = win[:need], win[need:]
            mine = part[max(lo - done, 0) : max(hi - done, 0)]  # all of part on one process
            if len(mine):
                rows = buf["row_of"][mine[:, 0]]
                pos = mine[:, 1:2] + np.arange(self.window)  # [b, w] consecutive positions
                pieces_a.append(buf["acts"][rows[:, None], pos])
                if buf["tokens"] is not None:
                    pieces_t.append(buf["tokens"][rows[:, None], pos])
                seqs.append(mine[:, 0])
                starts.append(mine[:, 1])
            done += len(part)
            need -= len(part)
            if len(rest):
                carry[0] = (buf, rest)
            else:
                carry.pop(0)
        cat = lambda xs: xs[0] if len(xs) == 1 else np.concatenate(xs)  # noqa: E731
        acts = torch.from_numpy(np.ascontiguousarray(cat(pieces_a), dtype=np.float32))
        toks = torch.from_numpy(cat(pieces_t)) if pieces_t else None
        batch = WindowBatch(acts, toks, torch.from_numpy(cat(seqs)), torch.from_numpy(cat(starts)))
        if self.device.type != "cpu":
            batch = WindowBatch(*(t.pin_memory() if t is not None else None for t in vars(batch).values()))
            batch = batch.to(self.device, non_blocking=True)
        return batch, carry, n_carry - n

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[WindowBatch]:
        batches = prefetch(self._batches(), self.prefetch, name="WindowBatches")
        try:
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                self.wait_s += time.perf_counter() - t0
                if batch is None:
                    return
                self.batches_yielded += 1
                yield batch
        finally:
            batches.close()
