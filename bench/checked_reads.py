"""What checked reads cost: a store read chunk by chunk through `ActivationStore` (sha256 of each chunk
on its first read, `pipeline.store_check`) against the same reads unchecked.

The store is written by the real writer (fp16 ``[n_seq, 128, 576]``, random data, chunks of 64
sequences) and read while its files are still in the page cache: the hot-cache case is the worst one
for the relative overhead (a cold read costs more and the hash the same).  Three patterns:

1. whole chunks in random order (how `WindowBatches` reads), first pass: every chunk is hashed;
2. the same again: every chunk is already verified, nothing is hashed;
3. 200 random single sequences on a fresh store: the first touch of a chunk reads all of it;
4. one epoch of `iter_windows` (the training loader: windows of 16, batches of 512) on a fresh
   store: the end-to-end cost where it matters; this is the reported value.

    python bench/checked_reads.py              # ~150 MB
    python bench/checked_reads.py --mb 600

The last line is JSON: {"name": "checked_loader_overhead", "value": loader epoch time ratio, ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.store import ActivationStore
from pipeline.store_writer import BackgroundWriter, Chunk, Layout, StoreWriter

HOOK, CTX, D, C = "blocks.0.hook_resid_post", 128, 576, 64


def write_store(path: Path, n_chunks: int) -> None:
    rng = np.random.default_rng(0)
    attrs = {
        "format": "tsae-activation-store",
        "format_version": 1,
        "key": "bench",
        "hooks": [HOOK],
        "ctx": CTX,
        "d_model": D,
        "store_dtype": "float16",
        "dtype": "float32",
        "prepend_bos": True,
        "max_tokens": None,
        "model": {"name": "bench", "spec": "bench", "weights_hash": None},
        "dataset": {"dataset": "x", "split": None, "text_column": "text", "config": None, "fingerprint": "x"},
    }
    w = StoreWriter.open(
        path,
        attrs=attrs,
        layout=Layout([HOOK], CTX, D, "float16", C),
        batch_size=16,
        capacity_seqs=n_chunks * C,
    )
    bg = BackgroundWriter(w)
    for c in range(n_chunks):
        acts = rng.standard_normal((C, CTX, D), dtype=np.float32).astype(np.float16)
        tokens = rng.integers(0, 49152, (C, CTX), dtype=np.int32)
        bg.put(Chunk(c, {HOOK: acts}, tokens, np.full(C, c, np.int64), np.zeros(C, np.int64)))
    bg.close()
    w.finish({})
    w.close()


def chunk_pass(store: ActivationStore, order) -> float:
    arr = store.activations(HOOK)
    t = time.perf_counter()
    for c in order:
        np.asarray(arr[c * C : (c + 1) * C])
    return time.perf_counter() - t


def sequences(store: ActivationStore, idx) -> float:
    t = time.perf_counter()
    for i in idx:
        store.read([int(i)], HOOK)
    return time.perf_counter() - t


def loader_epoch(store: ActivationStore) -> float:
    t = time.perf_counter()
    for _ in store.iter_windows(HOOK, window=16, batch_size=512, seed=0):
        pass
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n_chunks = max(2, round(args.mb * 2**20 / (C * CTX * D * 2)))
    root = Path(tempfile.mkdtemp(prefix="tsae-checked-"))
    try:
        write_store(root / "s", n_chunks)
        rng = np.random.default_rng(1)
        keys = (
            "raw",
            "checked first",
            "checked again",
            "raw seqs",
            "checked seqs",
            "raw epoch",
            "checked epoch",
        )
        times = {k: [] for k in keys}
        for _ in range(args.repeats):  # alternate, keep the best (the machine is shared)
            order = rng.permutation(n_chunks)
            times["raw"].append(chunk_pass(ActivationStore.open(root / "s", checked=False), order))
            checked = ActivationStore.open(root / "s")
            times["checked first"].append(chunk_pass(checked, order))
            times["checked again"].append(chunk_pass(checked, order))
            idx = rng.integers(0, n_chunks * C, 200)
            times["raw seqs"].append(sequences(ActivationStore.open(root / "s", checked=False), idx))
            times["checked seqs"].append(sequences(ActivationStore.open(root / "s"), idx))
            times["raw epoch"].append(loader_epoch(ActivationStore.open(root / "s", checked=False)))
            times["checked epoch"].append(loader_epoch(ActivationStore.open(root / "s")))
        best = {k: min(v) for k, v in times.items()}
        mb = n_chunks * C * CTX * D * 2 / 2**20
        for k in ("raw", "checked first", "checked again"):
            print(f"whole chunks, {k:14s}: {best[k]:.3f} s ({mb / best[k]:.0f} MB/s)")
        for k in ("raw seqs", "checked seqs"):
            print(f"200 random sequences, {k:12s}: {best[k]:.3f} s")
        for k in ("raw epoch", "checked epoch"):
            print(f"iter_windows epoch, {k:13s}: {best[k]:.3f} s ({n_chunks * C * CTX / best[k]:.0f} tok/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        json.dumps(
            {
                "name": "checked_loader_overhead",
                "value": round(best["checked epoch"] / best["raw epoch"], 3),
                "target": "<= 1.25 (one loader epoch on a fresh store, hot page cache: the worst case)",
                "chunk_reads_first_pass": round(best["checked first"] / best["raw"], 3),
                "chunk_reads_again": round(best["checked again"] / best["raw"], 3),
                "random_sequences": round(best["checked seqs"] / best["raw seqs"], 3),
                "mb": round(mb),
            }
        )
    )


if __name__ == "__main__":
    main()
