"""Reconstruction and sparsity metrics, accumulated in a stream of batches.

For activations x [B, T, d], reconstructions x_hat and codes f [B, T, F], over every evaluated token
(positions >= skip of every sequence, N tokens in all):

    mse            = (1/N) sum ||x - x_hat||^2                         (sum over d, mean over tokens)
    fvu            = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2       mean(x) over the whole eval set
    explained_var  = 1 - fvu
    cos_sim        = (1/N) sum cos(x, x_hat)
    l0             = (1/N) sum |{i : f_i > 0}|
    l1             = (1/N) sum ||f||_1
    seq_l0         = mean over sequences of |{i : f_i > 0 at any evaluated position}|
    frac_dead      = fraction of latents never active in the eval window
    frac_dense     = fraction of latents active on more than `dense_threshold` (10%) of tokens

The denominator of FVU needs the eval-set mean, unknown until the end.  It is accumulated exactly in
one pass as sum ||x - c||^2 - N ||mean(x) - c||^2, with c the first batch's mean (a shift that keeps
the float64 subtraction well conditioned).
"""

from __future__ import annotations

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.10


class ReconstructionStats:
    def __init__(self, d_sae: int, dense_threshold: float = DENSE_THRESHOLD):
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self.n_seq = 0
        self.shift: Tensor | None = None  # c [d]
        self.sum_dx = None  # sum (x - c) [d]
        self.sum_dx2 = 0.0  # sum ||x - c||^2
        self.sum_err2 = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.sum_seq_l0 = 0.0
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor, skip: int = 0) -> None:
        x = x[:, skip:].double()
        x_hat = x_hat[:, skip:].double()
        codes = codes[:, skip:]
        B, T, d = x.shape
        if self.shift is None:
            self.shift = x.reshape(-1, d).mean(0).cpu()
            self.sum_dx = torch.zeros(d, dtype=torch.float64)
        dx = x - self.shift.to(x.device)
        self.sum_dx += dx.sum((0, 1)).cpu()
        self.sum_dx2 += float(dx.pow(2).sum())
        self.sum_err2 += float((x - x_hat).pow(2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        active = codes > 0
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(codes.double().abs().sum())
        self.sum_seq_l0 += float(active.any(1).sum())
        self.fire_count += active.sum((0, 1)).double().cpu()
        self.n_tokens += B * T
        self.n_seq += B

    def total_variance(self) -> float:
        """sum ||x - mean(x)||^2 over the eval set."""
        mean_dx = self.sum_dx / self.n_tokens
        return self.sum_dx2 - self.n_tokens * float(mean_dx.pow(2).sum())

    def firing_rate(self) -> Tensor:
        """Fraction of evaluated tokens on which each latent fired, float64 [F]."""
        return self.fire_count / max(self.n_tokens, 1)

    def result(self) -> dict[str, float]:
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated")
        n = self.n_tokens
        fvu = self.sum_err2 / max(self.total_variance(), 1e-30)
        rate = self.firing_rate()
        return {
            "n_tokens": n,
            "mse": self.sum_err2 / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cos_sim": self.sum_cos / n,
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "seq_l0": self.sum_seq_l0 / self.n_seq,
            "frac_dead": float((self.fire_count == 0).double().mean()),
            "frac_dense": float((rate > self.dense_threshold).double().mean()),
        }
