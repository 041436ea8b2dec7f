"""Causal temporal crosscoder (architecture "crosscoder"), after "Crosscoding Through Time".

One shared TopK code per position t reads the window of the W positions ending at t and
reconstructs all of them, with one encoder and one decoder per lag j = 0..W-1:

    X[b, t, j] = x[b, t - j]                                        [B, T, W, d_in]
    pre_t      = sum_j (x_{t-j} - b_dec^{(j)}) @ W_enc^{(j)} + b_enc  [B, T, d_sae]
                 (lags reaching before position 0 contribute nothing: the input is read as b_dec)
    z_t        = TopK_k(ReLU(pre_t))
    x_hat_{t-j} = z_t @ W_dec^{(j)} + b_dec^{(j)}                      (the window reconstruction)

Shapes: W_enc [W, d_in, d_sae], b_enc [d_sae], W_dec [W, d_sae, d_in], b_dec [W, d_in].
The code at t depends only on x_{<=t} (causal); `decode(z)` returns the current-token reconstruction
z_t @ W_dec^{(0)} + b_dec^{(0)}, a function of the codes alone, and `dictionary` is W_dec^{(0)}.

Loss: mse_window = sum_j mean over (b, t) with t - j >= 0 of ||x_{t-j} - x_hat_{t-j}||^2 (trained),
"mse" = its j = 0 term (the current token, comparable with the per-token SAEs), plus aux-k on dead
latents against the window residual (averaged over window slots).  Each latent's decoder is unit
norm jointly over lags: sum_j ||W_dec^{(j)}_i||^2 = 1.  coeffs["k"] overrides k, coeffs["auxk"]
the aux weight.  Windows of a training batch that do not start a sequence see zeros as their past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsae.models.activity import FiringTracker, firing_counts
from tsae.models.base import SAE, SAEConfig, SAEOutput
from tsae.models.registry import register
from tsae.models.static import data_centre, unit_rows
from tsae.models.topk import auxk_loss, topk_activation


@dataclass
class CrosscoderConfig(SAEConfig):
    window: int = 4
    k: int = 32
    k_aux: int = 0  # 0 means d_in // 2
    auxk: float = 1 / 32
    unit_norm_decoder: bool = True
    dead_window_tokens: int = 1_000_000


@register
class TemporalCrosscoder(SAE):
    architecture = "crosscoder"
    config_class = CrosscoderConfig
    is_temporal = True

    def __init__(self, cfg: CrosscoderConfig):
        super().__init__(cfg)
        W, d_in, d_sae = cfg.window, cfg.d_in, cfg.d_sae
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = unit_rows(d_sae, W * d_in, g).reshape(d_sae, W, d_in).transpose(0, 1).contiguous()
        self.W_dec = nn.Parameter(W_dec)  # [W, d_sae, d_in], jointly unit norm per latent
        self.W_enc = nn.Parameter(W_dec.transpose(1, 2).clone())  # tied init
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(W, d_in))
        self.activity = FiringTracker(d_sae)

    def windows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """X [B, T, W, d] with X[:, t, j] = x[:, t-j] (0 before the start) and valid [T, W] = t >= j."""
        W, T = self.cfg.window, x.shape[-2]
        padded = F.pad(x, (0, 0, W - 1, 0))  # W-1 zero positions before t = 0
        X = padded.unfold(-2, W, 1).flip(-1).transpose(-1, -2)  # [..., T, W, d]
        valid = torch.arange(T, device=x.device)[:, None] >= torch.arange(W, device=x.device)[None, :]
        return X, valid

    def pre_activations(self, x: Tensor) -> Tensor:
        X, valid = self.windows(x)
        centred = (X - self.b_dec) * valid[..., None]
        return torch.einsum("...tjd,jdk->...tk", centred, self.W_enc) + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return topk_activation(self.pre_activations(x), self.cfg.k)

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec[0] + self.b_dec[0]

    def decode_window(self, codes: Tensor, bias: bool = True) -> Tensor:
        """[..., T, d_sae] -> [..., T, W, d_in]: reconstructions of x_{t-j} for every lag j."""
        out = torch.einsum("...tk,jkd->...tjd", codes, self.W_dec)
        return out + self.b_dec if bias else out

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        codes = topk_activation(pre, self.cfg.k)
        return SAEOutput(x_hat=self.decode(codes), codes=codes, aux={"pre": pre})

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        pre, codes = out.aux["pre"], out.codes
        k = int(coeffs.get("k", self.cfg.k))
        if k != self.cfg.k:
            codes = topk_activation(pre, k)
        fired, n_tokens = firing_counts(codes)
        if self.training:
            self.activity.record(fired, n_tokens)
        X, valid = self.windows(x)
        mask = valid[..., None].to(x.dtype)
        residual = (X - self.decode_window(codes)) * mask  # [B, T, W, d]
        err = residual.pow(2).sum(-1).reshape(-1, *valid.shape)  # [B, T, W]
        mse_lag = err.sum((0, 1)) / (valid.sum(0) * err.shape[0])  # [W]
        dead = self.activity.dead_mask(self.cfg.dead_window_tokens)
        k_aux = self.cfg.k_aux or self.cfg.d_in // 2
        aux = auxk_loss(residual, pre, dead, k_aux, lambda z: self.decode_window(z, bias=False) * mask)
        mse_window = mse_lag.sum()
        loss = mse_window + coeffs.get("auxk", self.cfg.auxk) * aux
        return {"loss": loss, "mse": mse_lag[0], "mse_window": mse_window, "auxk": aux,
                "l0": fired.sum() / n_tokens, "dead_frac": dead.float().mean()}

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.unit_norm_decoder:
            norms = self.W_dec.pow(2).sum((0, 2)).sqrt().clamp(min=1e-8)
            self.W_dec.div_(norms[None, :, None])

    @property
    def dictionary(self) -> Tensor:
        return self.W_dec[0]

    @torch.no_grad()
    def init_b_dec(self, x_sample: Tensor, method: str = "geometric_median") -> None:
        self.b_dec.copy_(data_centre(x_sample, method).to(self.b_dec).expand_as(self.b_dec))

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Rewrite a model trained on s * x to act on raw x (codes identical, x_hat scaled by 1/s)."""
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

