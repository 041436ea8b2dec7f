"""Sliding-window feature memory: a summary of the last w codes of a sequence.

Each position's code is projected once, then every position reads a window of its predecessors:

    u_t   = f_t @ P                                  P [F, h]           u [B, T, h]
    M_t   = (u_{t-w}, ..., u_{t-1})                  (strict, encoder)  M [B, T, w, h]
          = (u_{t-w+1}, ..., u_t)                    (inclusive, decoder)
            zeros stand in for positions before 0; nothing older than w positions enters.
    m_t   = LSTM(M_t) final hidden state             (use_lstm, from a zero state)      [B, T, h]
          = tanh(mean_w(M_t) @ A + a)                (no LSTM: a bag of recent codes)    [B, T, h]

`window_sum(u, w)` is the per-feature counterpart without projection: sum_{j<w} u_{t-j} [B, T, F].

The LSTM runs over all B*T windows at once (w sequential steps of [B*T, h] matmuls), so there is
no loop over positions and training is as parallel as for a static SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def causal_windows(u: Tensor, window: int, include_current: bool) -> Tensor:
    """u [B, T, h] -> [B, T, w, h]: the w positions before t (or ending at t), zero-padded."""
    lag = window if not include_current else window - 1
    padded = F.pad(u, (0, 0, lag, 0))  # padded[:, lag + t] = u[:, t]
    windows = padded.unfold(1, window, 1)[:, : u.shape[1]]  # [B, T, h, w], window s = padded[s : s + w]
    return windows.transpose(-1, -2)


def shifted(u: Tensor, lag: int) -> Tensor:
    """u [B, T, ...] delayed by lag positions along T (zeros enter at the start)."""
    if lag == 0:
        return u
    return F.pad(u, (0,) * (2 * (u.dim() - 2)) + (lag, 0))[:, : u.shape[1]]


def window_sum(u: Tensor, window: int) -> Tensor:
    """sum_{j=0..w-1} u_{t-j} for every t (zero-padded): u [B, T, F] -> [B, T, F].

    Built from sums over blocks of 1, 2, 4, ... positions (doubling), so it costs O(log w) passes
    and, unlike a difference of cumulative sums, every output is a sum of its own window's entries
    only: nothing outside the window changes it, even by rounding.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    total, covered, block, size = None, 0, u, 1  # block_t = sum of the `size` positions ending at t
    while True:
        if window & size:
            part = shifted(block, covered)
            total, covered = (part if total is None else total + part), covered + size
        if 2 * size > window:
            return total
        block, size = block + shifted(block, size), 2 * size


class WindowMemory(nn.Module):
    def __init__(self, d_sae: int, hidden: int, window: int, *, include_current: bool,
                 use_lstm: bool = True, code_scale: float = 1.0):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.include_current, self.use_lstm = window, include_current, use_lstm
        # Codes reconstruct x, so ||f|| ~ ||x||; code_scale = 1/||x|| keeps u of order 1.
        self.P = nn.Parameter(torch.randn(d_sae, hidden) * code_scale)
        self.summary = nn.LSTM(hidden, hidden, batch_first=True) if use_lstm else nn.Linear(hidden, hidden)

    def forward(self, codes: Tensor) -> Tensor:
        B, T, _ = codes.shape
        M = causal_windows(codes @ self.P, self.window, self.include_current)  # [B, T, w, h]
        if not self.use_lstm:
            return torch.tanh(self.summary(M.mean(2)))
        _, (h_last, _) = self.summary(M.reshape(B * T, self.window, -1))
        return h_last[-1].view(B, T, -1)
