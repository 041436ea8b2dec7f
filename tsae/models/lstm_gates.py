"""Per-feature gates and temporal pre-activations from the encoder memory.

Given the memory summary e_t [h] (window_memory.WindowMemory over the static codes, strictly
before t) and the lifecycle input a_t [F]:

    a_t   = min(age_{t-1}, w) / w          age of each static feature's current run at t-1, in [0, 1]
                                           (0 for features silent at t-1 and at t = 0)
    g_t   = sigma(e_t @ W_g + b_g + v * a_t) * gate_open        [F]   (use_gates)
          = gate_open                                           scalar (no gates)
    tau_t = e_t @ W_tau                                         [F]

a_t is nonzero for at most k features per token (those active at t-1), so it is added with a
scatter over their indices rather than built densely.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsae.models.lifecycle import ages_at


def lifecycle_input(static_codes: Tensor, k: int, window: int) -> tuple[Tensor, Tensor]:
    """Sparse a_t: (idx [B, T, k], value [B, T, k]) such that a_t[idx] = value.

    Position t lists the features active at t-1 (at most k per token) with min(age, w) / w;
    position 0 lists nothing (value 0).
    """
    k = min(int(k), static_codes.shape[-1])
    idx = static_codes.topk(k, dim=-1, sorted=False).indices  # the active features (+ zeros if fewer)
    age = ages_at(static_codes > 0, idx, window).to(static_codes.dtype) / window
    # shift one step later in T: position t reads what was true at t-1
    return F.pad(idx, (0, 0, 1, 0))[:, :-1], F.pad(age, (0, 0, 1, 0))[:, :-1]


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

    def forward(self, e: Tensor, gate_open: Tensor,
                lifecycle: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """e [B, T, h], gate_open scalar -> (g [B, T, F] or scalar, tau [B, T, F])."""
        tau = e @ self.W_tau
        if not self.use_gates:
            return gate_open, tau
        logits = e @ self.W_g + self.b_g
        if self.use_lifecycle_input:
            if lifecycle is None:
                raise ValueError("this gate takes the lifecycle input; pass lifecycle_input(codes, k, w)")
            idx, value = lifecycle
            logits = logits.scatter_add(-1, idx, self.v[idx] * value)
        return torch.sigmoid(logits) * gate_open, tau
