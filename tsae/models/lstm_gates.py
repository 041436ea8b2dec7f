"""Per-feature gates and temporal pre-activations from the encoder memory.

Given the memory summary e_t [h] (window_memory.WindowMemory over the static codes, strictly
before t) and the lifecycle input a_t [F]:

    a_t   = min(age_{t-1}, w) / w          age of each static feature's current run at t-1, in [0, 1]
                                           (0 for features silent at t-1, and everywhere at t = 0)
    g_t   = sigma(e_t @ W_g + b_g + v * a_t) * gate_open        [F]   (use_gates)
          = gate_open                                           scalar (no gates)
    tau_t = e_t @ W_tau                                         [F]

For speed the module returns sigma(...) *without* the gate_open factor and tau already multiplied
by a per-feature `tau_gain` (the caller passes lambda * gate_open, see bridge.py), so the [F]-sized
factors scale the small [h, F] weight instead of [B, T, F] activations.  a_t is nonzero only for the
features active at t-1 (k per token) and is added at their coordinates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tsae.models.lifecycle import ages_at

Coords = tuple[Tensor, Tensor, Tensor]


def lifecycle_input(static_codes: Tensor, window: int, nz: Tensor | None = None) -> tuple[Coords, Tensor]:
    """Sparse a_t [B, T, F]: ((b, t, f) coordinates, values) of its nonzero entries.

    Entry (b, t, f) carries min(age of f at t-1, w) / w, for each feature f active at t-1.
    nz: window_memory.nonzero_flat(static_codes), if the caller has it.
    """
    active = static_codes > 0
    if nz is None:
        b, t, f = active.nonzero(as_tuple=True)
    else:
        _, T, F = active.shape
        nz = nz[active.reshape(-1)[nz]]  # active = the positive ones among the nonzero entries
        b, t, f = nz // (T * F), nz // F % T, nz % F
    age = ages_at(active, (b, t, f), window).to(static_codes.dtype) / window
    keep = t + 1 < active.shape[1]
    return (b[keep], t[keep] + 1, f[keep]), age[keep]


class TemporalGates(nn.Module):
    def __init__(self, d_sae: int, hidden: int, *, use_gates: bool = True, use_lifecycle_input: bool = True):
        super().__init__()
        self.use_gates, self.use_lifecycle_input = use_gates, use_lifecycle_input
        std = 1 / math.sqrt(hidden)
        self.W_tau = nn.Parameter(torch.randn(hidden, d_sae) * std)
        if use_gates:
            self.W_g = nn.Parameter(torch.randn(hidden, d_sae) * std)
            self.b_g = nn.Parameter(torch.zeros(d_sae))
            if use_lifecycle_input:
                self.v = nn.Parameter(torch.zeros(d_sae))

    def forward(self, e: Tensor, tau_gain: Tensor,
                lifecycle: tuple[Coords, Tensor] | None = None) -> tuple[Tensor | None, Tensor]:
        """e [B, T, h], tau_gain [F] -> (sigma(gate logits) [B, T, F] or None, tau_gain * tau [B, T, F])."""
        B, T, _ = e.shape
        flat = e.reshape(B * T, -1)
        tau = (flat @ (self.W_tau * tau_gain)).view(B, T, -1)
        if not self.use_gates:
            return None, tau
        logits = torch.addmm(self.b_g, flat, self.W_g)  # [B*T, F]; edited in place below, not a view
        if self.use_lifecycle_input:
            if lifecycle is None:
                raise ValueError("these gates take the lifecycle input; pass lifecycle_input(codes, w)")
            (b, t, f), value = lifecycle
            logits.index_put_((b * T + t, f), self.v[f] * value, accumulate=True)
        return logits.sigmoid_().view(B, T, -1), tau
