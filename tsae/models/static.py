"""The static (per-token) SAE mechanism shared by ReLU-L1, TopK and T-SAE.

Parameters (SAELens names and shapes):
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

    pre   = (x - b_dec) @ W_enc + b_enc          [..., d_sae]
    f     = sigma(pre)                            (the subclass's sparsifier)
    x_hat = f @ W_dec + b_dec                     [..., d_in]

Every position is treated independently, so the map is trivially causal in T.

Conventions shared by every tsae model so losses compare:
  * reconstruction loss "mse" = mean over tokens of sum_d (x - x_hat)^2  (SAELens's convention);
  * init: decoder rows random unit vectors, encoder tied to the decoder (W_enc = W_dec^T),
    b_enc = 0, b_dec = 0 until `init_b_dec` sets it to the data's geometric median or mean;
  * `after_step` re-normalises decoder rows to unit norm (if cfg.unit_norm_decoder);
  * `fold_input_scale(s)`: a model trained on s * x is rewritten to act on raw x with identical
    codes and x_hat scaled by 1/s (W_enc *= s, W_dec /= s, b_dec /= s).  After folding the decoder
    rows have norm 1/s; `fold_input_scale(1/s)` undoes it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tsae.models.activity import FiringTracker
from tsae.models.base import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over tokens of the squared error summed over the feature dimension."""
    return (x - x_hat).pow(2).sum(-1).mean()


def unit_rows(n: int, d: int, generator: torch.Generator | None = None) -> Tensor:
    """[n, d] random directions of unit norm."""
    w = torch.randn(n, d, generator=generator)
    return w / w.norm(dim=-1, keepdim=True)


@torch.no_grad()
def geometric_median(points: Tensor, n_iter: int = 30, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iteration for argmin_m sum_i ||p_i - m||, points [N, d] -> [d]."""
    points = points.reshape(-1, points.shape[-1]).double()
    m = points.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (points - m).norm(dim=-1).clamp(min=eps)
        m_new = (w[:, None] * points).sum(0) / w.sum()
        if (m_new - m).norm() <= 1e-7 * m.norm().clamp(min=1.0):
            m = m_new
            break
        m = m_new
    return m.float()


def data_centre(x_sample: Tensor, method: str = "geometric_median") -> Tensor:
    """Centre [d] of a sample [..., d]: its geometric median (robust) or its mean."""
    x = x_sample.reshape(-1, x_sample.shape[-1])
    if method == "geometric_median":
        return geometric_median(x)
    if method == "mean":
        return x.float().mean(0)
    raise ValueError(f"unknown b_dec init {method!r}; use 'geometric_median' or 'mean'")


@dataclass
class StaticSAEConfig(SAEConfig):
    unit_norm_decoder: bool = True
    # A latent is dead when it has not fired in this many training tokens.
    dead_window_tokens: int = 1_000_000


class StaticSAE(SAE):
    """Linear encoder/decoder pair with a per-token sparsifier supplied by the subclass."""

    config_class = StaticSAEConfig

    def __init__(self, cfg: StaticSAEConfig):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = unit_rows(cfg.d_sae, cfg.d_in, g)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.activity = FiringTracker(cfg.d_sae)

    # ---- the linear maps -------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_activations(x))

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec

    @property
    def dictionary(self) -> Tensor:
        return self.W_dec

    # ---- training helpers ------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def init_b_dec(self, x_sample: Tensor, method: str = "geometric_median") -> None:
        """Set b_dec to the geometric median (robust) or the mean of a sample [..., d_in]."""
        self.b_dec.copy_(data_centre(x_sample.to(self.b_dec.device), method).to(self.b_dec))

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Rewrite a model trained on inputs s * x to act on raw x (codes identical)."""
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

    # ---- persistence -----------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Like SAE.load (but returned in eval mode), tolerating absent firing statistics; a SAELens
        folder goes to load_saelens."""
        import json

        from safetensors.torch import load_file

        from tsae.models.saelens_format import load_saelens, looks_like_saelens

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        if looks_like_saelens(cfg):
            return load_saelens(folder, device)
        model = cls.from_config_dict(cfg)
        state = load_file(str(folder / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("activity.")] + list(unexpected)
        if bad:
            raise ValueError(f"{folder}: weights do not match {cls.__name__}: {sorted(bad)}")
        return model.to(device).eval()  # inference mode: T-SAE then uses its causal threshold
