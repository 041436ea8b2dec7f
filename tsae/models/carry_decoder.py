"""The TSAE's temporal decoder, in the dictionary basis: features carried over or predicted from the past.

Shapes: codes f [B, T, F], window w, LSTM hidden h.  For every position t:

    mu_t = (1/w) sum_{j=0..w-1} f_{t-j}              window mean of the codes ending at t   [F]
    d_t  = LSTM_dec(Q^T f_{t-w+1}, ..., Q^T f_t)     window_memory.WindowMemory (inclusive)  [h]
    r_t  = sigma(d_t @ W_r + b_r)                    per-feature carry gates in (0, 1)       [F]
    p_t  = ReLU(d_t @ W_p + b_p)                     predicted coefficients (hand-overs)     [F]
    c_t  = gain * (r_t * mu_t + p_t) * 1[f_t <= 0]   the temporal decoder's coefficients      [F]

and the TSAE reconstructs with its one dictionary: x_hat_t = (f_t + c_t) @ W_dec + b_dec, where
gain = rho * gate_open [F] comes from the bridge (bridge.py; rho starts at 0, so a fresh TSAE is
its static SAE).  A feature that fires at t gets nothing from the decoder (the mask), so nothing is
counted twice.  One that fired in the last w - 1 positions and is silent now may be kept on
(persistence), with a strength r_t the LSTM sets from the recent context; one that did not fire
may be predicted from it (p_t: a feature that reliably follows another).  b_p starts at -1, so p_t
starts mostly at 0.  (Without r_t, i.e. a fixed per-feature carry strength, the planted-data gain
in persistent-feature recovery roughly halved: +0.011 instead of +0.019, seed 0.)

Why the dictionary basis.  The first design added a dense correction x_hat_t += d_t @ C [h, d]: it
lowered the error, but it let the decoder carry a persistent feature after its onset *without* the
feature's dictionary row, so those rows were trained on fewer tokens and recovered the planted
persistent features worse than a static SAE did (docs/training.md).  Through W_dec, every token on
which a feature is carried trains its row as well, and the temporal term stays interpretable: it
is a list of (feature, strength) pairs, like the codes.

Sparsity accounting: c_t is a deterministic function of the codes f_{t-w+1..t}, so it adds no
information per token; L0 counts the codes f_t.  The number of carried features is logged
(`carried`, see TemporalSAE.loss_terms) so it can be checked.

Cost per token: the memory (as the encoder's), 2 h F for the logits of r and p, O(k w h) for mu and
r where mu is nonzero (sparse codes; carry_coefficients.py fuses the rest).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tsae.models.carry_coefficients import carry_coefficients
from tsae.models.window_memory import WindowMemory, nonzero_flat


class CarryDecoder(nn.Module):
    def __init__(self, d_sae: int, *, hidden: int, window: int, use_lstm: bool = True,
                 code_scale: float = 1.0):
        super().__init__()
        self.window = window
        self.memory = WindowMemory(d_sae, hidden, window, include_current=True, use_lstm=use_lstm,
                                   code_scale=code_scale)
        self.W_r = nn.Parameter(torch.randn(hidden, d_sae) / math.sqrt(hidden))
        self.b_r = nn.Parameter(torch.zeros(d_sae))
        self.W_p = nn.Parameter(torch.randn(hidden, d_sae) / math.sqrt(hidden))
        self.b_p = nn.Parameter(torch.full((d_sae,), -1.0))

    def forward(self, codes: Tensor, gain: Tensor) -> Tensor:
        """codes f [B, T, F], gain [F] -> the coefficients a = f + c [B, T, F] that x_hat decodes."""
        nz = nonzero_flat(codes)  # the firing entries, found once for the memory, mu and the mask
        d = self.memory(codes, nz).flatten(0, 1)  # [B*T, h]
        logits_r = torch.addmm(self.b_r, d, self.W_r)  # [B*T, F]
        logits_p = torch.addmm(self.b_p, d, self.W_p)
        return carry_coefficients(codes, logits_r, logits_p, gain, nz, self.window)
