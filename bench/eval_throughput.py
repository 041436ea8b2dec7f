"""Evaluation throughput relative to the bare forward pass of the model.

Builds a small store (temporary cache home), saves randomly initialised SAEs (TopK and TSAE, d_sae =
8 d_model), runs `pipeline.eval_runner.run_eval` with the streaming metric groups (reconstruction,
splice, stability, lifetimes) and reads its timing: per batch the runner makes one clean and one
zero-ablation forward (shared by all SAEs) plus one patched forward per SAE, so with n SAEs the
ideal eval rate is bare / (2 + n).  Value = eval tokens/s / bare-forward tokens/s; the target asks
that everything besides the forwards costs at most 25% on top: value >= 0.8 / (2 + n).

    OMP_NUM_THREADS=1 python bench/eval_throughput.py                      # tiny model, quick
    python bench/eval_throughput.py --model smollm2-135m --layer 15 --n-seqs 16 --ctx 128
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--n-seqs", type=int, default=16)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()

    from pipeline.cache_runner import CacheConfig, build_cache
    from pipeline.eval_runner import EvalConfig, run_eval
    from pipeline.models import load_model
    from tsae.models.topk import TopKConfig, TopKSAE
    from tsae.models.tsae import TemporalSAE, TSAEConfig

    model = load_model(a.model, dtype=a.dtype, device="cpu")
    hook = model.hook_name(a.layer)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the held-out split is half the documents here, so the store holds ~2x the eval sequences
        store = build_cache(CacheConfig(model=a.model, layers=(a.layer,), ctx=a.ctx, dtype=a.dtype,
                                        max_tokens=3 * a.n_seqs * a.ctx, cache_dir=str(root / "cache"),
                                        chunk_seqs=8, progress=False), model=model)
        d, F = model.d_model, 8 * model.d_model
        saes = {
            "topk": TopKSAE(TopKConfig(d_in=d, d_sae=F, k=32, hook_name=hook)),
            "tsae": TemporalSAE(TSAEConfig(d_in=d, d_sae=F, k=32, hook_name=hook)),
        }
        folders = [str(sae.save(root / name)) for name, sae in saes.items()]
        cfg = EvalConfig(saes=folders, store=store.location, out_dir=str(root / "eval"), model=a.model,
                         val_fraction=0.5, n_seqs=a.n_seqs, batch_size=a.batch_size,
                         metrics=("reconstruction", "splice", "stability", "lifetimes"), log=False)
        res = run_eval(cfg, model=model)
    t = next(iter(res.values()))["timing"]
    n = len(saes)
    ratio = t["eval_tokens_per_s"] / t["bare_forward_tokens_per_s"]
    forwards = t["forward_s"] + t["patched_s"]
    print(f"model {model.name} {hook}: {t['tokens']} tokens, {n} SAEs, d_sae {F}")
    print(f"bare forward {t['bare_forward_tokens_per_s']:.0f} tok/s, eval {t['eval_tokens_per_s']:.0f} tok/s "
          f"(ideal {t['bare_forward_tokens_per_s'] / (2 + n):.0f}); forwards {forwards:.2f} s, "
          f"SAE encode/decode {t['sae_s']:.2f} s, metrics {t['metrics_s']:.2f} s of {t['pass_s']:.2f} s")
    target = f">= {0.8 / (2 + n):.3f}"
    print(json.dumps({"name": "eval_vs_forward", "value": round(ratio, 4), "target": target}))


if __name__ == "__main__":
    main()
