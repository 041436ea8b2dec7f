"""Benefit side of the TSAE's LSTM width h: reconstruction gain over the static SAE it starts from.

Synthetic sequences (tsae.data.synthetic: persistent features with mean lifetime 8, follow pairs)
whose L0 exceeds the SAE's k, so a code slot saved by predicting from the past is worth something.
A TopK SAE is trained for --steps; then, for the same number of further steps, (a) the static SAE
keeps training, and (b) a TSAE started from it (gates fully open) trains, once per h.  Reports
held-out FVU (fraction of variance unexplained).  Pair it with bench/tsae_cost.py for the cost.

    OMP_NUM_THREADS=1 python bench/tsae_hidden.py              # ~10 minutes on a core (docs/architecture.md)
    OMP_NUM_THREADS=1 python bench/tsae_hidden.py --steps 100      # quick check

Last line: JSON with the best h's FVU relative to the static FVU (target < 1: the TSAE helps).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from tsae.data.synthetic import generate
from tsae.models.topk import TopKConfig, TopKSAE
from tsae.models.tsae import TemporalSAE


def train(model, data: torch.Tensor, steps: int, lr: float, batch: int, seed: int, coeffs: dict) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        if hasattr(model, "set_coeffs"):
            model.set_coeffs(coeffs)
        loss = model.loss_terms(x, model(x), coeffs)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()


@torch.no_grad()
def fvu(model, x: torch.Tensor) -> float:
    model.eval()
    err = (model(x).x_hat - x).pow(2).sum()
    return float(err / (x - x.mean((0, 1))).pow(2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()

    torch.manual_seed(0)
    # 4096 training sequences (262k tokens): few epochs, so the temporal path cannot just memorise
    data = generate(d=64, n_feat=256, n_seq=4608, seq_len=64, rate=0.04, n_follow_pairs=32, seed=0)
    acts = torch.from_numpy(data.acts)
    acts = acts * (64**0.5 / acts.norm(dim=-1).mean())
    train_x, test_x = acts[:4096], acts[4096:]
    L0 = float((data.codes[:4096] > 0).sum(-1).mean())

    static = TopKSAE(TopKConfig(d_in=64, d_sae=256, k=a.k))
    static.init_b_dec(train_x, "mean")
    train(static, train_x, a.steps, a.lr, 32, 0, {})
    more = copy.deepcopy(static)
    train(more, train_x, a.steps, a.lr, 32, 1, {})
    base = fvu(more, test_x)
    print(f"true L0 {L0:.1f}, k={a.k}; static FVU after {2 * a.steps} steps: {base:.4f}")
    results = {}
    for h in a.hidden:
        model = TemporalSAE.from_static(static, lstm_hidden=h, window=a.window)
        train(model, train_x, a.steps, a.lr, 32, 1, {"gate_open": 1.0})
        results[h] = fvu(model, test_x)
        print(f"tsae h={h} w={a.window}: FVU {results[h]:.4f}  (relative to static {results[h] / base:.3f})")
    best = min(results, key=results.get)
    print(json.dumps({"name": "tsae_fvu_vs_static", "h": best, "value": round(results[best] / base, 4),
                      "target": "< 1"}))


if __name__ == "__main__":
    main()
