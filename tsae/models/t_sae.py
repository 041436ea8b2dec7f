"""T-SAE (architecture "t_sae"): Bhalla et al. 2025, "Temporal Sparse Autoencoders" (arXiv 2511.05541).

A Matryoshka BatchTopK SAE on the shared static maps whose latents are split into a high-level
group H = [0, n_high) (n_high = high_fraction * d_sae, 20% by default) and a low-level group.

    pre   = (x - b_dec) @ W_enc + b_enc                              [B, T, d_sae]
    train:     f = BatchTopK_{k * B * T}(ReLU(pre))   (top entries over the whole batch)
    inference: f = ReLU(pre) * [ReLU(pre) > theta]     (per token, hence causal)
    x_hat = f @ W_dec + b_dec

theta is a running estimate (EMA, rate 1 - threshold_beta) of the smallest positive BatchTopK code
of each training batch, collected after threshold_start_steps training steps.  Until theta exists,
inference falls back to per-token TopK_k.

Loss (reconstruction MSE = mean over tokens of the sum over d):
    matryoshka_high = MSE(x, f_H @ W_dec[H] + b_dec)       the high group alone
    mse             = MSE(x, x_hat)                         all latents
    contrastive     = symmetric InfoNCE between h_t = f_H(t) and its partner h_{t'}:
        t' uniform on the earlier positions of the same sequence (partner="random") or t-1
        ("previous"); logits_ij = sim(h_i, h'_j) / temperature over up to `contrastive_pairs`
        sampled anchors, sim = dot product (as the authors' code) or cosine; anchors of the same
        sequence are not used as each other's negatives (they share the sequence's topic).
    loss = high_weight * matryoshka_high + (1 - high_weight) * mse
           + contrastive * L_contrastive + auxk * L_aux        (L_aux: aux-k, see topk.py)
coeffs may override "contrastive", "auxk" and "k" (k annealing, see topk.py).

Data parallelism (training under torch.distributed, tsae/train/distributed.py): every batch-level
quantity is that of the global batch, so W ranks train the 1-process model.  BatchTopK keeps the
entries >= the global batch's (k * N)-th largest; theta's batch minimum is the minimum over ranks;
the pairs are sampled for the global batch from the same RNG stream on every rank (each rank
takes the pairs of its own rows), their high codes are gathered in the 1-process order, and every
rank computes the same InfoNCE, its gradient reaching each rank's own rows (batch_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tsae.models import batch_ops
from tsae.models.base import SAEOutput
from tsae.models.registry import register
from tsae.models.static import reconstruction_mse
from tsae.models.topk import KSparseSAE, TopKConfig, batch_topk_activation, topk_activation


def sample_partners(B: int, T: int, mode: str, device: torch.device | None = None) -> tuple[Tensor, ...]:
    """(seq, t, t') index vectors of anchor/partner pairs for every position t >= 1."""
    t = torch.arange(1, T, device=device).repeat(B)
    seq = torch.arange(B, device=device).repeat_interleave(T - 1)
    if mode == "previous":
        partner = t - 1
    elif mode == "random":
        partner = (torch.rand(t.shape, device=device) * t).long()  # uniform on [0, t-1]
    else:
        raise ValueError(f"unknown partner mode {mode!r}; use 'random' or 'previous'")
    return seq, t, partner


def info_nce(anchor: Tensor, partner: Tensor, group: Tensor | None = None, temperature: float = 1.0,
             similarity: str = "dot") -> Tensor:
    """Symmetric InfoNCE: anchor i should pick its own partner i among all partners (and back).

    anchor, partner: [N, h]; group [N]: pairs from the same group are not negatives of each other.
    """
    if similarity == "cosine":
        anchor, partner = F.normalize(anchor, dim=-1), F.normalize(partner, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}; use 'dot' or 'cosine'")
    logits = anchor @ partner.T / temperature
    if group is not None:
        same = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool,
                                                               device=group.device)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(anchor), device=anchor.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@dataclass
class ContrastiveTSAEConfig(TopKConfig):
    high_fraction: float = 0.2
    high_weight: float = 0.2  # Matryoshka weight of the high-group-only reconstruction
    contrastive: float = 0.1
    temperature: float = 1.0
    similarity: str = "dot"
    partner: str = "random"  # "random" earlier token of the same sequence, or "previous"
    contrastive_pairs: int = 1024
    threshold_beta: float = 0.999
    threshold_start_steps: int = 1000


@register
class ContrastiveTemporalSAE(KSparseSAE):
    architecture = "t_sae"
    config_class = ContrastiveTSAEConfig
    is_temporal = True

    def __init__(self, cfg: ContrastiveTSAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    @property
    def n_high(self) -> int:
        return int(self.cfg.high_fraction * self.cfg.d_sae)

    def activation(self, pre: Tensor) -> Tensor:
        """Inference sparsifier: the learned threshold (per token, causal)."""
        if self.threshold < 0:
            return topk_activation(pre, self.cfg.k)
        f = pre.relu()
        return f * (f > self.threshold)

    def train_codes(self, pre: Tensor, k: int) -> Tensor:
        return batch_topk_activation(pre, k)

    @torch.no_grad()
    def _update_threshold(self, codes: Tensor) -> None:
        self.train_steps += 1
        if self.train_steps <= self.cfg.threshold_start_steps:
            return
        low = batch_ops.global_min(codes.masked_fill(codes <= 0, float("inf")).min())
        if torch.isinf(low):  # nothing fired in the whole batch
            return
        beta = self.cfg.threshold_beta
        self.threshold.copy_(low if self.threshold < 0 else beta * self.threshold + (1 - beta) * low)

    def contrastive_loss(self, codes: Tensor) -> Tensor:
        """InfoNCE over pairs sampled for the global batch (this rank's share: rows [o, o + b))."""
        b, T, _ = codes.shape
        if T < 2:
            return codes.new_zeros(())
        offset, sizes = batch_ops.rows(b, codes.device)
        seq, t, partner = sample_partners(sum(sizes), T, self.cfg.partner, codes.device)
        if len(t) > self.cfg.contrastive_pairs:
            keep = torch.randperm(len(t), device=codes.device)[: self.cfg.contrastive_pairs]
            seq, t, partner = seq[keep], t[keep], partner[keep]
        high = codes[..., : self.n_high]
        if len(sizes) == 1:
            return info_nce(high[seq, t], high[seq, partner], seq, self.cfg.temperature, self.cfg.similarity)
        # each rank takes the pairs of its own rows; gathered in rank order they are the pairs
        # sorted (stably) by owner, put back into the 1-process order by the inverse permutation
        me = batch_ops.rank()
        owner = torch.bucketize(seq, torch.tensor(sizes, device=seq.device).cumsum(0), right=True)
        mine = (owner == me).nonzero().squeeze(1)
        rows = seq[mine] - offset
        pairs = torch.cat([high[rows, t[mine]], high[rows, partner[mine]]], -1)
        pairs = batch_ops.gather_with_grad(pairs, int((owner < me).sum()), sum(sizes) / b)
        pairs = pairs[torch.argsort(torch.argsort(owner, stable=True))]
        anchor, partner_codes = pairs.split(self.n_high, dim=-1)
        return info_nce(anchor, partner_codes, seq, self.cfg.temperature, self.cfg.similarity)

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        codes, _, terms = self.sparse_terms(x, out, coeffs)
        if self.training:
            self._update_threshold(codes)
        H = self.n_high
        mse_high = reconstruction_mse(x, codes[..., :H] @ self.W_dec[:H] + self.b_dec)
        contrastive = self.contrastive_loss(codes)
        w = self.cfg.high_weight
        loss = (w * mse_high + (1 - w) * terms["mse"] + coeffs.get("contrastive", self.cfg.contrastive)
                * contrastive + coeffs.get("auxk", self.cfg.auxk) * terms["auxk"])
        return {"loss": loss, **terms, "matryoshka_high": mse_high, "contrastive": contrastive,
                "threshold": self.threshold.clone()}

    def saelens_export(self) -> tuple[str, dict, dict]:
        """At inference this is a JumpReLU SAE with one threshold for every latent."""
        if self.threshold < 0:
            raise ValueError("t_sae has no inference threshold yet (train it first)")
        return "jumprelu", {}, {"threshold": self.threshold.expand(self.cfg.d_sae)}
