"""Forward+backward time of the TSAE (temporal path open) relative to its static TopK SAE.

One training step's model work (forward, loss_terms, backward; no optimiser) on B*T tokens of
random inputs, median of --reps timed runs after one warm-up.  Times are this process's CPU time
(time.process_time), which a machine shared with other jobs disturbs far less than wall time; with
OMP_NUM_THREADS=1 it equals the single-core wall time of an idle machine.

    OMP_NUM_THREADS=1 python bench/tsae_cost.py                       # d=576, F=4608, 32 x 128 tokens
    OMP_NUM_THREADS=1 python bench/tsae_cost.py --hidden 16 32 64    # h=32 is the default
    python bench/tsae_cost.py --d 64 --F 512 --reps 1                 # quick check
    TSAE_RETAIN_FREED=0 python bench/tsae_cost.py                     # glibc's default thresholds

Both models run with the trainers' allocator setting (tsae/host_allocator.py).

Prints one line per setting, then as the LAST line the static/TSAE throughput ratio of the first
setting as JSON (target >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tsae.host_allocator import retain_freed_blocks
from tsae.models.topk import TopKConfig, TopKSAE
from tsae.models.tsae import TemporalSAE


def step_time(model, x, coeffs, reps: int) -> float:
    def once():
        model.zero_grad(set_to_none=True)
        out = model(x)
        model.loss_terms(x, out, coeffs)["loss"].backward()

    once()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        once()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--F", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--hidden", type=int, nargs="+", default=[32])
    p.add_argument("--window", type=int, nargs="+", default=[16])
    p.add_argument("--no-lstm", action="store_true", help="time the use_lstm=False ablation")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    retain_freed_blocks()  # as the trainers do; TSAE_RETAIN_FREED=0 measures glibc's defaults

    torch.manual_seed(0)
    static = TopKSAE(TopKConfig(d_in=a.d, d_sae=a.F, k=a.k)).train()
    x = torch.randn(a.B, a.T, a.d)
    t_static = step_time(static, x, {}, a.reps)
    print(f"static topk: {t_static * 1e3:.0f} ms CPU / {a.B * a.T} tokens")
    ratios = []
    for h in a.hidden:
        for w in a.window:
            model = TemporalSAE.from_static(static, lstm_hidden=h, window=w, use_lstm=not a.no_lstm).train()
            model.set_coeffs({"gate_open": 1.0})
            with torch.no_grad():  # open the bridges so every temporal op is really exercised
                model.bridge.lam.fill_(0.1)
                model.bridge.rho.fill_(0.1)  # per feature: the decoder carries codes
            t = step_time(model, x, {"gate_open": 1.0}, a.reps)
            ratios.append(t_static / t)
            print(f"tsae h={h} w={w}: {t * 1e3:.0f} ms CPU, throughput ratio {ratios[-1]:.2f}")
    print(json.dumps({"name": "tsae_vs_topk_throughput", "value": round(ratios[0], 3), "target": ">= 0.5"}))


if __name__ == "__main__":
    main()
