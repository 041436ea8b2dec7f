"""Measure zarr layouts for the activation store: write speed, files, and cold read patterns.

Each layout stores the same fp16 array [n_seq, ctx, d] (random normal data, which compresses a
little worse than real activations), written the way the cache writes it: whole chunks (or whole
shards) of `--chunk-seqs` sequences in order.  Reads are *cold*: every file of the array is
fsynced and then evicted from the page cache with posix_fadvise(DONTNEED) before every single read
(eviction time not counted).

    python bench/store_layout.py                      # ~150 MB per layout, a minute or two
    python bench/store_layout.py --mb 1000 --d 768    # closer to the storage notes' setting

Read tests: whole chunks in random order (how WindowBatches reads), random single sequences,
random 16-position windows read one by one, and a sequential scan.  The last line is JSON: the
default layout's (chunk64) write speed over the fastest other layout's, measured in this run
(docs/cache.md chose chunk64 because it writes fastest: target >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

LAYOUTS = {  # name -> (chunk seqs, shard seqs or None, compressors)
    "chunk64": (64, None, None),
    "chunk16": (16, None, None),
    "chunk64+zstd": (64, None, "auto"),
    "shard64/chunk1": (1, 64, None),
    "shard64/chunk8": (8, 64, None),
}
DEFAULT = "chunk64"  # the cache's layout (docs/cache.md, "Choosing the chunk shape")


def files_of(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def evict(path: Path) -> None:
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make(path: Path, layout: str, n_seq: int, ctx: int, d: int):
    chunk, shard, comp = LAYOUTS[layout]
    return zarr.create_array(
        zarr.storage.LocalStore(path),
        shape=(n_seq, ctx, d),
        dtype="float16",
        chunks=(chunk, ctx, d),
        shards=None if shard is None else (shard, ctx, d),
        compressors=comp,
        fill_value=0.0,
    )


def bench_layout(root: Path, layout: str, data: np.ndarray, args, rng) -> dict:
    n_seq, ctx, d = data.shape
    path = root / layout.replace("/", "_").replace("+", "_")
    unit = LAYOUTS[layout][1] or LAYOUTS[layout][0]  # write unit in sequences
    unit = max(unit, 64)  # the cache hands the writer 64 sequences at a time
    arr = make(path, layout, n_seq, ctx, d)
    t0 = time.perf_counter()
    for s in range(0, n_seq, unit):
        arr[s : s + unit] = data[s : s + unit]
    evict(path)  # includes fsync: the write is on disk
    write_s = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in files_of(path))
    out = {
        "layout": layout,
        "write_GBps": data.nbytes / write_s / 1e9,
        "files_per_GB": len(files_of(path)) / (data.nbytes / 1e9),
        "ratio": data.nbytes / nbytes,
    }
    arr = zarr.open_array(zarr.storage.LocalStore(path), mode="r")

    def cold(ops, n):  # every op starts cold: the array's files are evicted before each one
        total = 0.0
        for op in ops:
            evict(path)
            t = time.perf_counter()
            op()
            total += time.perf_counter() - t
        return n / total

    cs = 64
    order = rng.permutation(n_seq // cs)[: args.reads]
    out["chunk_reads_MBps"] = (
        cold([lambda c=c: arr[c * cs : (c + 1) * cs] for c in order], len(order) * cs * ctx * d * 2) / 1e6
    )
    seqs = rng.integers(0, n_seq, args.reads)
    out["random_seq_per_s"] = cold([lambda s=s: arr[int(s)] for s in seqs], len(seqs))
    starts = rng.integers(0, ctx - 16, args.reads)
    out["random_win16_per_s"] = cold(
        [lambda s=s, t=t: arr[int(s), int(t) : int(t) + 16] for s, t in zip(seqs, starts, strict=True)],
        len(seqs),
    )
    out["scan_GBps"] = cold([lambda: [arr[s : s + 256] for s in range(0, n_seq, 256)]], data.nbytes) / 1e9
    shutil.rmtree(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=150, help="size of the array per layout, MB")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--d", type=int, default=576, help="576 = SmolLM2-135M")
    ap.add_argument("--reads", type=int, default=200, help="random reads per read test")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under ./cache)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    if DEFAULT not in layouts:  # the headline compares the default with the others
        layouts.insert(0, DEFAULT)
    rng = np.random.default_rng(0)
    n_seq = int(args.mb * 1e6 / (args.ctx * args.d * 2)) // 64 * 64
    data = rng.standard_normal((n_seq, args.ctx, args.d), dtype=np.float32).astype(np.float16)
    base = Path(args.dir or Path(__file__).resolve().parents[1] / "cache")
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="store_layout_", dir=base))
    rows = []
    try:
        for layout in layouts:
            rows.append(bench_layout(root, layout, data, args, rng))
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{n_seq} sequences x {args.ctx} x {args.d} fp16 = {data.nbytes / 1e6:.0f} MB per layout")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    default = next(r for r in rows if r["layout"] == DEFAULT)
    others = [r for r in rows if r["layout"] != DEFAULT]
    rival = max(others, key=lambda r: r["write_GBps"]) if others else None
    print(
        json.dumps(
            {
                "name": "default_layout_write_vs_best_other",
                "value": round(default["write_GBps"] / rival["write_GBps"], 3) if rival else None,
                "target": ">= 1",
                "default": DEFAULT,
                "best_other": rival["layout"] if rival else None,
                "default_write_GBps": round(default["write_GBps"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
