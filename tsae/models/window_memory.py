"""Sliding-window feature memory: a summary of the last w codes of a sequence.

Each position's code is projected once, then every position reads a window of its predecessors:

    u_t   = f_t @ P                                  P [F, h]           u [B, T, h]
            (from the k nonzero codes of each token: sparse_project)
    M_t   = (u_{t-w}, ..., u_{t-1})                  (strict, encoder)  M [B, T, w, h]
          = (u_{t-w+1}, ..., u_t)                    (inclusive, decoder)
            zeros stand in for positions before 0; nothing older than w positions enters.
    m_t   = LSTM(M_t) final hidden state             (use_lstm, from a zero state)      [B, T, h]
          = tanh(mean_w(M_t) @ A + a)                (no LSTM: a bag of recent codes)    [B, T, h]

`window_sum(f, w)` is the per-feature counterpart without projection: sum_{j<w} f_{t-j} [B, T, F].

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


def nonzero_flat(codes: Tensor) -> Tensor:
    """Flat indices (b T + t) F + f of the nonzero entries of codes [B, T, F] (or [N, F]), in order.

    One pass over the codes; sparse_project, window_sum and lifecycle_input all take it, so a
    caller that feeds them the same codes finds the nonzero entries once."""
    return codes.detach().reshape(-1).nonzero().squeeze(1)


def window_spread(src: Tensor, shape: torch.Size, window: int) -> tuple[Tensor, Tensor]:
    """Where each nonzero entry of u [B, T, F] lands in sum_{j<w} u_{t-j}.

    src: nonzero_flat(u) [n].  Entry (b, t, f) lands on (b, t + j, f) for the lags j < L = min(w, T).
    Returns (valid [n, L] bool: t + j < T; dst [n, L]: the flat destinations, where not valid the
    entry's own position, so a caller can weight those pairs by 0 instead of compacting them out).
    Entry-major order keeps the destinations of consecutive entries within w positions of each
    other, so a gather or scatter at dst sweeps memory once (lag-major order swept it L times:
    ~3x slower at B*T*F = 19M)."""
    _, T, F = shape
    t = (src // F) % T
    lags = torch.arange(min(window, T), device=src.device)
    valid = t[:, None] + lags[None] < T
    return valid, torch.where(valid, src[:, None] + lags[None] * F, src[:, None])


class _SparseWindowSum(torch.autograd.Function):
    """sum_{j<w} u_{t-j} over the nonzero entries of u only, forward and backward."""

    @staticmethod
    def forward(ctx, u: Tensor, window: int, src: Tensor) -> Tensor:
        B, T, F = u.shape
        flat = u.detach().reshape(-1)
        valid, dst = window_spread(src, u.shape, window)  # src: nonzero_flat(u)
        values = flat[src][:, None] * valid  # [n, L]; pairs past the sequence's end add exact zeros
        out = torch.zeros_like(flat).index_add_(0, dst.view(-1), values.view(-1))
        ctx.save_for_backward(src, dst, valid)
        ctx.shape = u.shape
        return out.view(B, T, F)

    @staticmethod
    def backward(ctx, grad: Tensor):
        src, dst, valid = ctx.saved_tensors
        per_lag = grad.reshape(-1)[dst] * valid  # [n, L]
        out = grad.new_zeros(ctx.shape).view(-1)
        out[src] = per_lag.sum(1)
        return out.view(ctx.shape), None, None


class _SparseProject(torch.autograd.Function):
    """codes [N, F] @ P [F, h] from the nonzero entries of codes (gradient to those entries only)."""

    @staticmethod
    def forward(ctx, codes: Tensor, P: Tensor, nz: Tensor) -> Tensor:
        row, f = nz // codes.shape[1], nz % codes.shape[1]  # nz: nonzero_flat(codes)
        values = codes.detach().reshape(-1)[nz]
        out = P.new_zeros(codes.shape[0], P.shape[1]).index_add_(0, row, values[:, None] * P.detach()[f])
        ctx.save_for_backward(row, f, values, P)
        ctx.n_features = codes.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        row, f, values, P = ctx.saved_tensors
        g_rows = grad[row]  # [n, h]
        grad_codes = grad_P = None
        if ctx.needs_input_grad[0]:
            grad_codes = grad.new_zeros(grad.shape[0], ctx.n_features)
            grad_codes[row, f] = (g_rows * P[f]).sum(-1)
        if ctx.needs_input_grad[1]:
            grad_P = torch.zeros_like(P).index_add_(0, f, values[:, None] * g_rows)
        return grad_codes, grad_P, None


def sparse_project(codes: Tensor, P: Tensor, nz: Tensor | None = None) -> Tensor:
    """codes [..., F] @ P [F, h] in O(nonzeros * h): for k-sparse codes, k h per token instead of F h.

    The gradient reaches the nonzero entries of codes only (exact for codes from a sparse selection,
    as for window_sum).  nz: nonzero_flat(codes), if the caller has it."""
    flat = codes.reshape(-1, codes.shape[-1])
    nz = nonzero_flat(flat) if nz is None else nz
    return _SparseProject.apply(flat, P, nz).view(*codes.shape[:-1], P.shape[1])


def window_sum(codes: Tensor, window: int, nz: Tensor | None = None) -> Tensor:
    """sum_{j=0..w-1} f_{t-j} for every t (zeros before 0): codes [B, T, F] -> [B, T, F].

    Computed from the nonzero entries (B T k of them for TopK codes, each added to w positions),
    so it costs O(B T k w) instead of passes over [B, T, F]; every output is a sum of its own
    window's entries only, so nothing outside the window changes it, even by rounding.  The
    gradient is returned at the nonzero entries of `codes` only: exact for codes from a sparse
    selection (TopK, ReLU), whose zero entries pass no gradient back anyway.  nz: nonzero_flat(codes),
    if the caller has it.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return _SparseWindowSum.apply(codes, window, nonzero_flat(codes) if nz is None else nz)


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

    def forward(self, codes: Tensor, nz: Tensor | None = None) -> Tensor:
        """codes [B, T, F] (nz: nonzero_flat(codes), if the caller has it) -> m [B, T, h]."""
        B, T, _ = codes.shape
        u = sparse_project(codes, self.P, nz)  # [B, T, h]
        M = causal_windows(u, self.window, self.include_current)  # [B, T, w, h]
        if not self.use_lstm:
            return torch.tanh(self.summary(M.mean(2)))
        _, (h_last, _) = self.summary(M.reshape(B * T, self.window, -1))
        return h_last[-1].view(B, T, -1)
