"""Bridge connections: learned gains where the temporal path joins the static one.

    encoder:  pre_t   = s_t + lambda * g_t * tau_t           lambda [F]   (per feature)
    decoder:  c_t     = gate_open * rho * carried_t            rho [F]      (per feature)

(carried_t = (r_t * mu_t + p_t) * 1[f_t <= 0], carry_decoder.py.)  With `learned=True` both start at 0, so a
freshly built TSAE is its static SAE even with the gates open; the optimiser then opens each
feature's temporal input and output only as far as it lowers the loss.  With `learned=False` (the
no-bridge ablation) lambda = rho = 1 are fixed buffers: the temporal terms enter at full strength
as soon as the gates open.

The gains are folded into the small weights they multiply: encoder_gain = lambda * gate_open into
the columns of the gates' W_tau (lstm_gates.py), so no extra pass over [B, T, F] activations is
needed there; `encoder` then adds gate * tau.  decoder_gain = rho * gate_open [F] scales the
carried coefficients (r_t * mu_t + p_t) (carry_coefficients.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Bridge(nn.Module):
    def __init__(self, d_sae: int, *, learned: bool = True, decoder: bool = True):
        super().__init__()
        shapes = {"lam": d_sae, **({"rho": d_sae} if decoder else {})}
        for name, n in shapes.items():
            if learned:
                self.register_parameter(name, nn.Parameter(torch.zeros(n)))
            else:
                self.register_buffer(name, torch.ones(n))

    def encoder_gain(self, gate_open: Tensor) -> Tensor:
        return self.lam * gate_open

    def encoder(self, s: Tensor, gate: Tensor | None, tau: Tensor) -> Tensor:
        """s + gate * tau (tau already carries lambda * gate_open); gate None means 1."""
        return s + tau if gate is None else s + gate * tau  # (addcmul's backward costs 2 more passes)

    def decoder_gain(self, gate_open: Tensor) -> Tensor:
        return self.rho * gate_open
