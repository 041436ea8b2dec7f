"""Training throughput: the trainers against a bare PyTorch loop and against the loader, in one run.

    python bench/train_throughput.py                       # builds a small store with the tiny model
    python bench/train_throughput.py --store KEY --tokens 2000000 --d-sae 9216 --k 32

Measured on the same store, at the same dictionary size, k and tokens per step (batch x window):

    bare      forward + loss + backward + Adam step (+ decoder renorm) of a TopK SAE on in-memory
              tensors of the trainers' batch shape: the floor of what a training step costs
    topk      train_static(topk):       the shared loop + WindowBatches reading the store
    tsae      train_tsae, refine phase (temporal path open), memory window 16; with --tsae-phases all,
              the three phases as the default experiment splits them (teacher forward included)
    t_sae     train_static(t_sae)       crosscoder  train_static(crosscoder, window 4)
    loader    WindowBatches alone over the same store (tokens/s it can deliver)

Trainer tokens/s come from the loop's own log (tokens / time between log points, first interval
dropped as warm-up), so setup (b_dec init, store sampling) and saving are excluded.  Prints one JSON
line per figure; the last line is the loop-overhead ratio topk / bare (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from tsae.data.windows import WindowBatches  # noqa: E402
from tsae.host_allocator import retain_freed_blocks  # noqa: E402
from tsae.train.loop import auto_device  # noqa: E402
from tsae.train.setup import build_sae  # noqa: E402
from tsae.train.static_trainer import StaticTrainerConfig, train_static  # noqa: E402
from tsae.train.tsae_trainer import TSAETrainerConfig, train_tsae  # noqa: E402


def small_store(cache_dir: str, n_tokens: int) -> str:
    from pipeline.cache_runner import CacheConfig, build_cache

    cfg = CacheConfig(model="tiny", ctx=128, max_tokens=n_tokens, chunk_seqs=64, batch_size=32,
                      progress=False, cache_dir=cache_dir)
    return build_cache(cfg).key


def interval_rate(records: list[dict]) -> float:
    """tokens/s over the logged intervals, the first (warm-up) one dropped when there are 3+."""
    spans, prev = [], 0
    for r in records:
        if "event" in r or "tokens_per_s" not in r:
            continue
        n = r["tokens"] - prev
        spans.append((n, n / r["tokens_per_s"]))
        prev = r["tokens"]
    if len(spans) > 2:
        spans = spans[1:]
    return sum(n for n, _ in spans) / sum(t for _, t in spans)


def cuda_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def bare_loop(d: int, d_sae: int, k: int, batch: int, window: int, steps: int, device, lr: float) -> float:
    """tokens/s of the bare TopK step on in-memory batches of the trainers' shape."""
    model = build_sae("topk", d, d_sae, 0, k=k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xs = [torch.randn(batch, window, d, device=device) for _ in range(8)]

    def step(x):
        out = model(x)
        loss = model.loss_terms(x, out, {})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step()

    for i in range(5):  # warm-up
        step(xs[i % 8])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(xs[i % 8])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * window / (time.perf_counter() - t0)


def loader_rate(acts, window: int, batch: int, n_tokens: int) -> float:
    wb = WindowBatches(acts, window=window, batch_size=batch, seed=1, n_tokens=n_tokens)
    it = iter(wb)
    next(it)  # warm-up: first buffer read
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b.acts.numel() // acts.shape[-1]
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="activation store key or path (default: build one with the tiny model)")
    p.add_argument("--cache-dir")
    p.add_argument("--hook")
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens per trainer")
    p.add_argument("--d-sae", type=int, default=0, help="dictionary size (default 16 x d_model)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-windows", type=int, default=64)
    p.add_argument("--window", type=int, default=64, help="training window (positions per sample)")
    p.add_argument("--only", default="tsae,t_sae,crosscoder", help="trainers besides topk")
    p.add_argument("--repeats", type=int, default=2, help="alternations of bare loop and topk trainer")
    p.add_argument("--device", default="auto")
    p.add_argument("--tsae-phases", choices=("refine", "all"), default="refine",
                   help="refine: the TSAE's refine phase only (temporal path open throughout); all: the "
                        "three phases in the default experiment's proportions (3/16 distill, 5/16 "
                        "introduce, 1/2 refine) with k annealed from 2k, teacher forward included; the "
                        "topk arm keeps k fixed, as the experiment's static baselines do")
    args = p.parse_args(argv)
    device = auto_device(args.device)
    # every arm (the bare loop too) under the allocator setting the trainers use; TSAE_RETAIN_FREED=0
    # measures all of them with glibc's defaults
    retain_freed_blocks_set = retain_freed_blocks() if device.type == "cpu" else False

    from pipeline.store import ActivationStore

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="tsae-bench-")
        args.cache_dir = tmp.name
        args.store = small_store(tmp.name, max(args.tokens // 4, 128 * 256))
    store = ActivationStore.open(args.store, args.cache_dir)
    hook = args.hook or store.hooks[0]
    acts = store.activations(hook)
    d = store.d_model
    d_sae = args.d_sae or 16 * d
    B, w = args.batch_windows, args.window
    step_tokens = B * w
    log_every = max(10, args.tokens // step_tokens // 10)
    common = dict(k=args.k, lr=1e-4, batch_windows=B, window=w, n_tokens=args.tokens, log_every=log_every,
                  progress=False, device=str(device), d_sae=d_sae, dead_window_tokens=10**9)
    print(json.dumps({"store": store.key, "hook": hook, "d_model": d, "d_sae": d_sae, "k": args.k,
                      "tokens_per_step": step_tokens, "device": str(device), "tokens": args.tokens,
                      "retain_freed_blocks": retain_freed_blocks_set}))

    rates: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    steps = max(20, min(200, args.tokens // step_tokens))
    rates["loader"] = loader_rate(acts, w, B, args.tokens)
    # bare loop and topk trainer alternate `repeats` times; the best of each counts (robust to the
    # bursts of a shared machine)
    for _ in range(args.repeats):
        cuda_reset(device)
        rates["bare"] = max(rates.get("bare", 0), bare_loop(d, d_sae, args.k, B, w, steps, device, 1e-4))
        peaks["bare"] = cuda_peak(device)
        cuda_reset(device)
        res = train_static(StaticTrainerConfig(architecture="topk", **common), acts)
        rates["topk"] = max(rates.get("topk", 0), interval_rate(res.records))
        peaks["topk"] = cuda_peak(device)
    only = args.only.split(",")
    for arch in ("t_sae", "crosscoder"):
        if arch not in only:
            continue
        kw = {"model_kwargs": {"window": 4}} if arch == "crosscoder" else {}
        cuda_reset(device)
        res = train_static(StaticTrainerConfig(architecture=arch, **common, **kw), acts)
        rates[arch], peaks[arch] = interval_rate(res.records), cuda_peak(device)
    if "tsae" in only:
        static = build_sae("topk", d, d_sae, 0, k=args.k)
        cuda_reset(device)
        n = args.tokens
        phases = dict(distill_tokens=0, introduce_tokens=0, refine_tokens=n, k_start=0)
        if args.tsae_phases == "all":
            phases = dict(distill_tokens=3 * n // 16, introduce_tokens=5 * n // 16,
                          refine_tokens=n - 3 * n // 16 - 5 * n // 16, k_start=2 * args.k)
        tcfg = TSAETrainerConfig(k=args.k, **phases, memory_window=16, lr=1e-4, batch_windows=B,
                                 window=w, log_every=log_every, progress=False, device=str(device),
                                 dead_window_tokens=10**9)
        res = train_tsae(tcfg, acts, static=static)
        rates["tsae"], peaks["tsae"] = interval_rate(res.records), cuda_peak(device)

    print(json.dumps({"tokens_per_s": {k: round(v) for k, v in rates.items()},
                      "cuda_peak_MiB": peaks if device.type == "cuda" else None,
                      "max_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    topk = rates["topk"]
    headroom = round(rates["loader"] / topk, 2)
    print(json.dumps({"name": "loader_headroom", "value": headroom, "target": ">= 5"}))
    for arch, target in (("tsae", ">= 0.5"), ("t_sae", None), ("crosscoder", None)):
        if arch in rates:
            name = "tsae_all_phases" if arch == "tsae" and args.tsae_phases == "all" else arch
            line = {"name": f"{name}_vs_topk_trainer", "value": round(rates[arch] / topk, 3)}
            print(json.dumps({**line, "target": target} if target else line))
    print(json.dumps({"name": "topk_trainer_vs_bare_loop", "value": round(topk / rates["bare"], 3),
                      "target": ">= 0.95"}))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
