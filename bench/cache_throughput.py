"""Cache build throughput against the bare model forward, storage-only write speed, bytes on disk.

1. **cache_vs_forward**: tokens/s of a real `build_cache` (tokenise, forward through `run_to_hooks`,
   writer thread with stats + sha256 + zarr writes, manifest) against the bare TransformerLens
   forward ``bridge(tokens, stop_at_layer=L + 1)`` on the *same* token batches, same model, dtype
   and batch size, in one process.  The two run back to back ``--repeats`` times (alternating which
   goes first); the value is best bare time / best build time.  On a shared machine a run is either
   undisturbed or several times slower (torch's two threads stall when another process takes a
   core), so the best of several runs is the estimate of the undisturbed speed; the per-pair ratios
   and the median CPU time of each side are printed too.  Because even that can be off by 2x here,
   a load-robust estimate is printed as well: the share of the build's wall time spent in forward
   passes, times bare / `run_to_hooks` timed batch by batch alternately.  Target: >= 0.95.
2. **storage only**: the writer path alone (`StoreWriter` behind `BackgroundWriter`, chunks of
   ``[64, ctx, d_model]`` fp16 plus tokens) against a raw numpy memmap write of the same bytes
   (flushed), both followed by fsync; and a whole `build_cache` with the tiny model, whose forward is
   negligible, as tokens/s.
3. **bytes on disk per token** of the real store against raw fp16 activations + int32 tokens, and
   how well real stored activations compress (zstd level 3, lz4), to justify storing them raw.

    python bench/cache_throughput.py                          # SmolLM2-135M layer 15, 16384 tokens
    python bench/cache_throughput.py --tokens 32768 --repeats 3 --layer 6 --dtype bfloat16

The last line is JSON: {"name": "cache_vs_forward", "value": ..., "target": ">= 0.95"}.
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
import torch
from numcodecs import LZ4, Zstd

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.models import load_model
from pipeline.sequences import iter_sequences
from pipeline.sources import iter_documents
from pipeline.store import ActivationStore
from pipeline.store_writer import BackgroundWriter, Chunk, Layout, StoreWriter


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def fsync_tree(path: Path) -> None:
    for p in Path(path).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def bare_forward(model, tokens: np.ndarray, layer: int, batch_size: int, chunk_seqs: int) -> None:
    """The bare forward over the batches a build forms (batches inside chunks)."""
    with torch.inference_mode():
        for c in range(0, len(tokens), chunk_seqs):
            chunk = tokens[c : c + chunk_seqs]
            for b in range(0, len(chunk), batch_size):
                model.bridge(torch.from_numpy(chunk[b : b + batch_size]).long(), stop_at_layer=layer + 1)


def hook_overhead(model, tokens: np.ndarray, layer: int, batch_size: int) -> float:
    """bare time / run_to_hooks time over the same batches, alternated batch by batch (so both
    sides see the same load): the share of the bare speed that TransformerLens hooks leave."""
    hook = f"blocks.{layer}.hook_resid_post"
    times = {"bare": 0.0, "hooks": 0.0}
    for i, b in enumerate(range(0, len(tokens), batch_size)):
        batch = torch.from_numpy(tokens[b : b + batch_size]).long()
        sides = [
            ("bare", lambda x=batch: _bare(model, x, layer)),
            ("hooks", lambda x=batch: model.run_to_hooks(x, [hook])),
        ]
        for name, fn in sides if i % 2 == 0 else sides[::-1]:
            t = time.perf_counter()
            fn()
            times[name] += time.perf_counter() - t
    return times["bare"] / times["hooks"]


def _bare(model, batch, layer: int) -> None:
    with torch.inference_mode():
        model.bridge(batch, stop_at_layer=layer + 1)


def storage_only(root: Path, n_chunks: int, ctx: int, d: int) -> dict:
    """GB/s of the store writer and of a numpy memmap writing the same bytes (after fsync)."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((64, ctx, d), dtype=np.float32).astype(np.float16)
    tokens = rng.integers(0, 49152, (64, ctx), dtype=np.int32)
    ids = np.zeros(64, dtype=np.int64)
    hook = "blocks.0.hook_resid_post"
    layout = Layout([hook], ctx, d, "float16", 64)
    attrs = {"key": "bench", "format": "bench"}
    t = time.perf_counter()
    writer = StoreWriter.open(
        root / "store", attrs=attrs, layout=layout, batch_size=16, capacity_seqs=64 * n_chunks
    )
    bg = BackgroundWriter(writer)
    for c in range(n_chunks):
        bg.put(Chunk(c, {hook: acts}, tokens, ids, ids))
    bg.close()
    writer.close()
    fsync_tree(root / "store")
    zarr_s = time.perf_counter() - t
    nbytes = n_chunks * (acts.nbytes + tokens.nbytes + 2 * ids.nbytes)

    t = time.perf_counter()
    mm = np.memmap(root / "raw.f16", dtype=np.float16, mode="w+", shape=(n_chunks * 64, ctx, d))
    mt = np.memmap(root / "raw.i32", dtype=np.int32, mode="w+", shape=(n_chunks * 64, ctx))
    for c in range(n_chunks):
        mm[c * 64 : (c + 1) * 64] = acts
        mt[c * 64 : (c + 1) * 64] = tokens
    mm.flush()
    mt.flush()
    del mm, mt
    fsync_tree(root)
    memmap_s = time.perf_counter() - t
    return {
        "store_writer_GBps": nbytes / zarr_s / 1e9,
        "memmap_GBps": nbytes / memmap_s / 1e9,
        "writer_vs_memmap": memmap_s / zarr_s,
        "bytes": nbytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=None, help="default: the build's default, n_layers // 2")
    ap.add_argument(
        "--tokens", type=int, default=16384, help="whole chunks of 64 x ctx give honest bytes/token"
    )
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--storage-mb", type=float, default=200, help="bytes for the storage-only test")
    ap.add_argument("--dir", default=None, help="scratch directory (default: under ./cache)")
    args = ap.parse_args()

    base = Path(args.dir or Path(__file__).resolve().parents[1] / "cache")
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=base))
    models_link = root / "models"
    models_link.symlink_to(Path(__file__).resolve().parents[1] / "cache" / "models", target_is_directory=True)
    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        layer = model.n_layers // 2 if args.layer is None else args.layer
        cfg = CacheConfig(
            model=args.model,
            layers=(layer,),
            ctx=args.ctx,
            max_tokens=args.tokens,
            dtype=args.dtype,
            batch_size=args.batch_size,
            device=args.device,
            progress=False,
        )
        docs = iter_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.config)
        seqs = iter_sequences(docs, model.tokenizer, cfg.ctx, cfg.prepend_bos, cfg.max_tokens)
        tokens = np.stack([s.tokens for s in seqs])
        n_tok = tokens.size
        bare_forward(model, tokens[: args.batch_size], layer, args.batch_size, cfg.chunk_seqs)  # warm-up

        bare_s, build_s, bare_cpu, build_cpu, result = [], [], [], [], None
        for r in range(args.repeats):  # alternate which side goes first
            home = root / f"run{r}"
            home.mkdir()
            (home / "models").symlink_to(models_link.resolve(), target_is_directory=True)
            run_cfg = CacheConfig(**{**cfg.__dict__, "cache_dir": str(home)})
            sides = [
                ("bare", lambda: bare_forward(model, tokens, layer, args.batch_size, cfg.chunk_seqs)),
                ("build", lambda c=run_cfg: build_cache(c, model=model)),
            ]
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                wall, cpu = time.perf_counter(), time.process_time()
                out = fn()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                (bare_s if name == "bare" else build_s).append(wall)
                (bare_cpu if name == "bare" else build_cpu).append(cpu)
                if name == "build":
                    result = out
                    assert not result.hit and result.n_tokens == n_tok
        paired = [b / c for b, c in zip(bare_s, build_s, strict=True)]  # each pair ran back to back
        ratio = min(bare_s) / min(build_s)
        hooks_share = hook_overhead(model, tokens, layer, args.batch_size)
        model_share = result.attrs["model_seconds"] / build_s[-1]
        store_bytes = du(Path(result.location))
        raw = n_tok * (model.d_model * 2 + 4)
        print(
            f"model {model.name} layer {layer} {args.dtype} on {model.device}: {n_tok} tokens, "
            f"batch {args.batch_size}, ctx {args.ctx}"
        )
        print(f"bare forward: {n_tok / min(bare_s):.0f} tok/s (runs: {fmt(bare_s)} s)")
        print(
            f"build_cache : {n_tok / min(build_s):.0f} tok/s (runs: {fmt(build_s)} s; "
            f"writer thread busy {result.attrs['writer_busy_seconds']:.2f} s)"
        )
        print(f"ratio build/forward: best of each {ratio:.3f}; back-to-back pairs: {fmt(paired)}")
        print(
            f"load-robust estimate: {model_share * hooks_share:.3f} = forward share of the last build's wall "
            f"time {model_share:.3f} x bare/run_to_hooks alternated batch by batch {hooks_share:.3f}"
        )
        print(
            f"CPU seconds (all threads), median: bare {np.median(bare_cpu):.2f}, "
            f"build {np.median(build_cpu):.2f}"
            f" -> ratio {np.median(bare_cpu) / np.median(build_cpu):.3f} (less sensitive to other processes)"
        )
        print(
            f"bytes on disk per token: {store_bytes / n_tok:.1f} "
            f"(raw fp16 acts + int32 tokens: {raw / n_tok:.0f}; "
            f"ratio {store_bytes / raw:.3f})"
        )

        chunk = np.asarray(
            ActivationStore.open(result.location).activations(f"blocks.{layer}.hook_resid_post")[:64]
        )
        print(
            f"compression of real stored activations ({chunk.dtype}, one chunk): "
            + ", ".join(
                f"{name} {chunk.nbytes / len(codec.encode(chunk)):.3f}x"
                for name, codec in [("zstd-3", Zstd(level=3)), ("lz4", LZ4())]
            )
        )

        n_chunks = max(1, int(args.storage_mb * 1e6 / (64 * args.ctx * (model.d_model * 2 + 4))))
        st = storage_only(root / "storage", n_chunks, args.ctx, model.d_model)
        print(
            f"storage only ({st['bytes'] / 1e6:.0f} MB, d={model.d_model}): store writer "
            f"{st['store_writer_GBps']:.2f} GB/s, numpy memmap {st['memmap_GBps']:.2f} GB/s "
            f"(writer/memmap {st['writer_vs_memmap']:.2f})"
        )
        tiny = load_model("tiny")
        home = root / "tiny"
        home.mkdir()
        (home / "models").symlink_to(models_link.resolve(), target_is_directory=True)
        # layer 0: TransformerLens computes the unembedding when asked to stop after the last layer
        t = build_cache(
            CacheConfig(
                model="tiny",
                layers=(0,),
                ctx=args.ctx,
                max_tokens=max(args.tokens, 65536),
                cache_dir=str(home),
                progress=False,
            ),
            model=tiny,
        )
        print(
            f"tiny-model build (layer 0, d_model {tiny.d_model}; its forward still dominates): "
            f"{t.tokens_per_s:.0f} tok/s, "
            f"{t.n_tokens * (tiny.d_model * 2 + 4) / t.seconds / 1e6:.1f} MB/s of arrays"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        json.dumps(
            {
                "name": "cache_vs_forward",
                "value": round(ratio, 3),
                "target": ">= 0.95",
                "load_robust_estimate": round(model_share * hooks_share, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
