"""TopK SAE (architecture "topk", Gao et al. 2024), and the k-sparse mechanism it shares with the T-SAE.

    pre   = (x - b_dec) @ W_enc + b_enc                   [B, T, d_sae]
    f     = TopK_k(ReLU(pre))   (the k largest per token kept, the rest zeroed)
    x_hat = f @ W_dec + b_dec                              [B, T, d_in]
    loss  = mean_tokens ||x - x_hat||^2 + auxk * L_aux

BatchTopK (the T-SAE's training sparsifier) keeps the k * n_tokens largest entries of ReLU(pre) over
the whole batch: every entry >= tau, tau = the (k * n_tokens)-th largest (ties at tau all kept).
Under data parallelism tau is that of the global batch (batch_ops.kth_largest).

Auxiliary-k loss against dead latents D (not fired in cfg.dead_window_tokens tokens):
    e     = stop_grad(x - x_hat)                           the residual
    z_aux = TopK_{k_aux}(pre restricted to D),  k_aux = min(cfg.k_aux or d_in // 2, |D|)
            (no ReLU: a latent is usually dead because its pre-activations are negative, and it
            must still receive a gradient to come back)
    L_aux = min(|D| / k_aux, 1) * mean_tokens ||e - z_aux @ W_dec||^2
            (gradient reaches dead latents only; the factor quiets it while few latents are dead)

`KSparseSAE` holds what TopK and T-SAE share: the forward (training sparsifier `train_codes`,
inference sparsifier `activation`), k for the step, firing statistics, MSE, aux-k and L0.
The step's k (k annealing) is taken by `set_coeffs` before the forward, which sparsifies at it;
a loss given coeffs["k"] other than the forward's k (out.aux["k"]) recomputes codes and x_hat from
the pre-activations kept in out.aux["pre"].  coeffs["auxk"] weights L_aux
(default cfg.auxk = 1/32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tsae.models import batch_ops
from tsae.models.activity import firing_counts
from tsae.models.base import SAEOutput
from tsae.models.registry import register
from tsae.models.static import StaticSAE, StaticSAEConfig, reconstruction_mse


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of ReLU(pre) along the last dim, zero the rest.

    Selected first, rectified after: TopK_k(ReLU(pre)) = ReLU(TopK_k(pre)) (ReLU is monotone;
    where fewer than k entries are positive, either way the extra picks write zeros), and the
    ReLU and its backward then touch k entries per token instead of all d_sae."""
    values, idx = topk_parts(pre, k)
    return torch.zeros_like(pre).scatter(-1, idx, values)


def topk_parts(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [..., k] of TopK_k(ReLU(pre)): what topk_activation scatters."""
    values, idx = pre.topk(min(int(k), pre.shape[-1]), dim=-1, sorted=False)
    return values.relu(), idx


def sparse_decode(values: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[..., j] * W_dec[idx[..., j]]: codes @ W_dec from the k nonzero codes per token,
    k d multiply-adds instead of d_sae d (an embedding bag; ~25x faster than the dense product at
    k = 32, d_sae = 4,608, measured).  Differs from the dense product by float rounding only."""
    flat_v, flat_i = values.reshape(-1, values.shape[-1]), idx.reshape(-1, idx.shape[-1])
    out = torch.nn.functional.embedding_bag(flat_i, W_dec, per_sample_weights=flat_v, mode="sum")
    return out.view(*values.shape[:-1], W_dec.shape[1])


def batch_topk_activation(pre: Tensor, k: int) -> Tensor:
    """BatchTopK over the (global) batch [..., d_sae]: ReLU(pre) where >= its (k * n_tokens)-th largest.

    A collective under data parallelism: call it on every rank (training only)."""
    f = pre.relu()
    n_tokens = batch_ops.rows(f.numel() // f.shape[-1], f.device)[1]
    tau = batch_ops.kth_largest(f.detach(), int(k) * sum(n_tokens))
    return torch.where(f >= tau, f, 0.0)


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


class KSparseSAE(StaticSAE):
    """A static SAE with k-sparse codes and aux-k against dead latents (TopK, T-SAE; the TSAE keeps
    its own forward and loss but shares k_aux and the step's k); cfg: a TopKConfig."""

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.k_step: int | None = None  # set by set_coeffs for k annealing; not saved

    def set_coeffs(self, coeffs: dict[str, float]) -> None:
        """Take the step's k (annealing) before forward; cfg.k when coeffs has none."""
        self.k_step = int(coeffs["k"]) if "k" in coeffs else None

    @property
    def k(self) -> int:
        """The training sparsifier's k this step."""
        return self.k_step if self.k_step is not None else self.cfg.k

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or self.cfg.d_in // 2

    def activation(self, pre: Tensor) -> Tensor:
        """Inference sparsifier (per token, causal)."""
        return topk_activation(pre, self.cfg.k)

    def train_codes(self, pre: Tensor, k: int) -> Tensor:
        """Training sparsifier at k."""
        return topk_activation(pre, k)

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        if not self.training:  # inference: cfg.k (or the T-SAE's threshold)
            codes = self.activation(pre)
            return SAEOutput(x_hat=self.decode(codes), codes=codes, aux={"pre": pre})
        codes = self.train_codes(pre, self.k)
        return SAEOutput(x_hat=self.decode(codes), codes=codes, aux={"pre": pre, "k": self.k})

    def sparse_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]
                     ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(codes, x_hat, {"mse", "auxk" (unweighted), "l0", "dead_frac"}) at the step's k; in
        training, the firing statistics are updated with the codes.  A forward that sparsified at
        another k (set_coeffs not called with these coeffs) is redone from out.aux["pre"]."""
        pre, codes, x_hat = out.aux["pre"], out.codes, out.x_hat
        k = int(coeffs.get("k", self.cfg.k))
        if k != int(out.aux.get("k", self.cfg.k)):
            codes = self.train_codes(pre, k) if self.training else topk_activation(pre, k)
            x_hat = self.decode(codes)
        fired, n_tokens = firing_counts(codes)
        if self.training:
            self.activity.record(fired, n_tokens)
        dead = self.activity.dead_mask(self.cfg.dead_window_tokens)
        aux = auxk_loss(x - x_hat, pre, dead, self.k_aux, lambda z: z @ self.W_dec)
        return codes, x_hat, {"mse": reconstruction_mse(x, x_hat), "auxk": aux,
                              "l0": fired.sum() / n_tokens, "dead_frac": dead.float().mean()}


@register
class TopKSAE(KSparseSAE):
    architecture = "topk"
    config_class = TopKConfig

    def saelens_export(self) -> tuple[str, dict, dict]:
        return "topk", {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}, {}

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        _, _, terms = self.sparse_terms(x, out, coeffs)
        return {"loss": terms["mse"] + coeffs.get("auxk", self.cfg.auxk) * terms["auxk"], **terms}
