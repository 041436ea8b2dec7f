"""Toy SAEs with known answers, honouring the SAE contract, and a tiny small-vocabulary model."""

from __future__ import annotations

import torch
from torch import Tensor

from tsae.models.base import SAE, SAEConfig


def tiny_bridge(d_vocab: int = 97, n_layers: int = 2, seed: int = 0):
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=64, d_head=16, n_heads=4, n_layers=n_layers, n_ctx=128,
                                  d_vocab=d_vocab, d_mlp=256, act_fn="gelu", normalization_type="LN",
                                  seed=seed, default_prepend_bos=False)
    return TransformerBridge.boot_native(cfg).eval()


class IdentitySAE(SAE):
    """The perfect SAE: f = [ReLU(x), ReLU(-x)] (d_sae = 2 d), x_hat = f_+ - f_- = x exactly."""

    architecture = "test_identity"

    def __init__(self, d: int):
        super().__init__(SAEConfig(d_in=d, d_sae=2 * d))
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype/device

    def encode(self, x: Tensor) -> Tensor:
        return torch.cat([x.relu(), (-x).relu()], dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        d = self.cfg.d_in
        return codes[..., :d] - codes[..., d:]

    @property
    def dictionary(self) -> Tensor:
        eye = torch.eye(self.cfg.d_in)
        return torch.cat([eye, -eye])


class ZeroSAE(IdentitySAE):
    """Codes as the identity, but decodes to 0: splicing it is exactly zero ablation."""

    def decode(self, codes: Tensor) -> Tensor:
        return torch.zeros(*codes.shape[:-1], self.cfg.d_in, dtype=codes.dtype, device=codes.device)


class PlantedSAE(SAE):
    """Identity SAE plus planted latents: latent d_id + j fires with value `amp` only at positions[j]
    (-1: never) and decodes to direction v_j; the identity part reconstructs x - sum_j planted_j.

    With `carry` > 0 the planted part has a temporal decoder: x_hat_t += carry * planted_{t-1} v.
    """

    architecture = "test_planted"

    def __init__(self, d: int, directions: Tensor, positions: list[int], amp: float = 3.0,
                 carry: float = 0.0):
        n = len(positions)
        super().__init__(SAEConfig(d_in=d, d_sae=2 * d + n))
        self.register_buffer("V", directions.float())  # [n, d]
        self.positions, self.amp, self.carry = positions, amp, carry
        self.identity = IdentitySAE(d)

    def planted(self, B: int, T: int, device) -> Tensor:
        p = torch.zeros(B, T, len(self.positions), device=device)
        for j, t in enumerate(self.positions):
            if 0 <= t < T:
                p[:, t, j] = self.amp
        return p

    def _planted_part(self, p: Tensor) -> Tensor:
        out = p @ self.V
        if self.carry:
            out[:, 1:] = out[:, 1:] + self.carry * (p[:, :-1] @ self.V)
        return out

    def encode(self, x: Tensor) -> Tensor:
        p = self.planted(x.shape[0], x.shape[1], x.device)
        return torch.cat([self.identity.encode(x - self._planted_part(p)), p], dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        n = len(self.positions)
        return self.identity.decode(codes[..., :-n]) + self._planted_part(codes[..., -n:])

    @property
    def dictionary(self) -> Tensor:
        return torch.cat([self.identity.dictionary, self.V])


class LinearSAE(SAE):
    """f = ReLU(x W_enc + b_enc), x_hat = f W_dec (a static SAE with given weights)."""

    architecture = "test_linear"

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor):
        super().__init__(SAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1]))
        self.W_enc, self.b_enc, self.W_dec = (torch.nn.Parameter(t.float()) for t in (W_enc, b_enc, W_dec))

    def encode(self, x: Tensor) -> Tensor:
        return (x @ self.W_enc + self.b_enc).relu()

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec

    @property
    def dictionary(self) -> Tensor:
        return self.W_dec
