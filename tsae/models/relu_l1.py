"""ReLU SAE with a decoder-norm-weighted L1 penalty (architecture "relu_l1", SAELens "standard").

    f     = ReLU((x - b_dec) @ W_enc + b_enc)            [B, T, d_sae]
    x_hat = f @ W_dec + b_dec                             [B, T, d_in]
    loss  = mean_tokens ||x - x_hat||^2 + l1 * mean_tokens sum_i f_i ||W_dec_i||

The L1 coefficient comes from coeffs["l1"] (the trainer's schedule), else cfg.l1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tsae.models.activity import firing_counts
from tsae.models.base import SAEOutput
from tsae.models.registry import register
from tsae.models.static import StaticSAE, StaticSAEConfig, reconstruction_mse


@dataclass
class ReluL1Config(StaticSAEConfig):
    l1: float = 5.0


@register
class ReluL1SAE(StaticSAE):
    architecture = "relu_l1"
    config_class = ReluL1Config

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def saelens_export(self) -> tuple[str, dict, dict]:
        return "standard", {}, {}

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        fired, n_tokens = firing_counts(out.codes)
        if self.training:
            self.activity.record(fired, n_tokens)
        mse = reconstruction_mse(x, out.x_hat)
        l1 = (out.codes * self.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = mse + coeffs.get("l1", self.cfg.l1) * l1
        return {"loss": loss, "mse": mse, "l1": l1, "l0": fired.sum() / n_tokens}
