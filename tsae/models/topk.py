"""TopK SAE (architecture "topk", Gao et al. 2024), plus the TopK and auxiliary-k helpers.

    pre   = (x - b_dec) @ W_enc + b_enc                   [B, T, d_sae]
    f     = TopK_k(ReLU(pre))   (the k largest per token kept, the rest zeroed)
    x_hat = f @ W_dec + b_dec                              [B, T, d_in]
    loss  = mean_tokens ||x - x_hat||^2 + auxk * L_aux

Auxiliary-k loss against dead latents D (not fired in cfg.dead_window_tokens tokens):
    e     = stop_grad(x - x_hat)                           the residual
    z_aux = TopK_{k_aux}(pre restricted to D),  k_aux = min(cfg.k_aux or d_in // 2, |D|)
            (no ReLU: a latent is usually dead because its pre-activations are negative, and it
            must still receive a gradient to come back)
    L_aux = min(|D| / k_aux, 1) * mean_tokens ||e - z_aux @ W_dec||^2
            (gradient reaches dead latents only; the factor quiets it while few latents are dead)

coeffs["k"] overrides k for the step (k annealing): codes and x_hat are then recomputed from the
pre-activations kept in out.aux["pre"], and the loss uses them.  coeffs["auxk"] weights L_aux
(default cfg.auxk = 1/32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tsae.models.base import SAEOutput
from tsae.models.registry import register
from tsae.models.static import StaticSAE, StaticSAEConfig, reconstruction_mse


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of ReLU(pre) along the last dim, zero the rest."""
    k = min(int(k), pre.shape[-1])
    values, idx = pre.relu().topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, values)


def batch_topk_activation(pre: Tensor, k: int) -> Tensor:
    """BatchTopK: keep the k * n_tokens largest entries of ReLU(pre) over the whole batch [..., d_sae]."""
    flat = pre.relu().reshape(-1)
    n_keep = min(int(k) * (flat.numel() // pre.shape[-1]), flat.numel())
    values, idx = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, values).reshape(pre.shape)


def auxk_loss(residual: Tensor, pre: Tensor, dead: Tensor, k_aux: int,
              decode: Callable[[Tensor], Tensor]) -> Tensor:
    """min(|D|/k_aux, 1) * mean ||stop_grad(residual) - decode(z_aux)||^2; 0 if nothing is dead.

    `decode` maps codes to the residual's shape without the decoder bias (e.g. z -> z @ W_dec).
    """
    codes_aux = auxk_codes(pre, dead, k_aux)
    if codes_aux is None:
        return residual.new_zeros(())
    scale = min(int(dead.sum()) / k_aux, 1.0)
    return scale * reconstruction_mse(residual.detach(), decode(codes_aux))


def auxk_codes(pre: Tensor, dead: Tensor, k_aux: int) -> Tensor | None:
    """The k_aux largest dead pre-activations (signed, no ReLU) per token; None if none is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0 or k_aux <= 0:
        return None
    values, idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, values)


@dataclass
class TopKConfig(StaticSAEConfig):
    k: int = 32
    k_aux: int = 0  # 0 means d_in // 2
    auxk: float = 1 / 32


@register
class TopKSAE(StaticSAE):
    architecture = "topk"
    config_class = TopKConfig

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or self.cfg.d_in // 2

    def activation(self, pre: Tensor) -> Tensor:
        return topk_activation(pre, self.cfg.k)

    def saelens_export(self) -> tuple[str, dict, dict]:
        return "topk", {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}, {}

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        codes = self.activation(pre)
        return SAEOutput(x_hat=self.decode(codes), codes=codes, aux={"pre": pre})

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        pre, codes, x_hat = out.aux["pre"], out.codes, out.x_hat
        k = int(coeffs.get("k", self.cfg.k))
        if k != self.cfg.k:
            codes = topk_activation(pre, k)
            x_hat = self.decode(codes)
        if self.training:
            self.activity.update(codes)
        dead = self.activity.dead_mask(self.cfg.dead_window_tokens)
        mse = reconstruction_mse(x, x_hat)
        aux = auxk_loss(x - x_hat, pre, dead, self.k_aux, lambda z: z @ self.W_dec)
        loss = mse + coeffs.get("auxk", self.cfg.auxk) * aux
        l0 = (codes > 0).float().sum(-1).mean()
        return {"loss": loss, "mse": mse, "auxk": aux, "l0": l0.detach(),
                "dead_frac": dead.float().mean()}
