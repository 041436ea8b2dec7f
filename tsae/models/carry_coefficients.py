"""The temporal decoder's coefficient map, with a forward and backward that skip what is zero.

    a_t = f_t + gain * (sigma(l^r_t) * mu_t + ReLU(l^p_t)) * 1[not f_t > 0]        [B, T, F]
    mu_t = (1/w) sum_{j<w} f_{t-j}

f the codes, l^r = d W_r + b_r and l^p = d W_p + b_p the decoder's gate and prediction logits
(carry_decoder.py), gain = rho * gate_open [F]; x_hat = a @ W_dec + b_dec.  The same numbers as
composing torch ops (tested against that composition, values and gradients), computed in fewer
passes over [B*T, F]:

  * r = sigma(l^r) matters only where mu != 0, i.e. at the window's nonzero codes: B*T*k*w
    entries (window_memory.window_spread), so r and its gradient are evaluated there only;
  * mu is never formed densely: each nonzero code adds gain * r * f / w at its w destinations;
  * the mask, the gain and "+ f" are applied in the same passes as the prediction term.

Gradients, with G = dL/da:
    dL/df        = G + (window-sum adjoint of) G * gain * r * 1[not fire] / w at the nonzero codes
    dL/dl^p      = G * gain * 1[not fire] * 1[l^p > 0]
    dL/dl^r      = G * gain * mu * 1[not fire] * r (1 - r)            (nonzero only where mu is)
    dL/dgain_f   = sum_t G * (r * mu + ReLU(l^p)) * 1[not fire]
As for window_sum, the gradient through mu reaches the nonzero codes only (exact for codes from
a sparse selection, whose zero entries pass no gradient back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsae.models.window_memory import window_spread


class _CarryCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes: Tensor, logits_r: Tensor, logits_p: Tensor, gain: Tensor, nz: Tensor,
                window: int) -> Tensor:
        F = codes.shape[-1]
        flat = codes.detach().reshape(-1)
        values = flat[nz]  # nz = nonzero_flat(codes)
        fires = nz[values > 0]
        valid, dst = window_spread(nz, codes.shape, window)  # [n, L] each
        f_dst = dst % F
        r = logits_r.detach().reshape(-1)[dst].sigmoid()  # [n, L]: r where mu is nonzero
        carry = r * (values[:, None] * valid) / window  # gain-free carry terms, summed at dst
        p = logits_p.detach().relu()
        out = torch.addcmul(codes.detach(), p.view_as(codes), gain.detach())
        out.view(-1).index_add_(0, dst.view(-1), (carry * gain.detach()[f_dst]).view(-1))
        out.view(-1)[fires] = flat[fires]  # a firing feature is not carried on top of itself
        ctx.save_for_backward(p, gain, nz, valid, dst, f_dst, r, fires, carry)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, gain, nz, valid, dst, f_dst, r, fires, carry = ctx.saved_tensors
        shape = grad.shape
        # G with the firing entries zeroed: there a = f, so only the codes receive gradient
        masked = grad.reshape(-1).clone()
        at_fires = masked[fires]
        masked[fires] = 0.0
        at_dst = masked[dst]  # [n, L]
        g_dst = at_dst * gain[f_dst]  # dL/d(carry term) at each destination
        grad_r = grad_p = grad_gain = None
        if ctx.needs_input_grad[1]:
            grad_r = torch.zeros_like(masked).index_add_(
                0, dst.view(-1), (g_dst * carry * (1 - r)).view(-1)).view(p.shape)
        G = masked.view(p.shape)
        if ctx.needs_input_grad[2]:
            grad_p = torch.ops.aten.threshold_backward(G * gain, p, 0.0)
        if ctx.needs_input_grad[3]:
            grad_gain = (G * p).sum(0).index_add_(0, f_dst.view(-1), (at_dst * carry).view(-1))
        grad_codes = None
        if ctx.needs_input_grad[0]:  # G + the window sum's adjoint at the nonzero codes
            masked[fires] = at_fires
            per_entry = (g_dst * r * valid).sum(1) / ctx.window
            grad_codes = masked.index_add_(0, nz, per_entry).view(shape)
        return grad_codes, grad_r, grad_p, grad_gain, None, None


def carry_coefficients(codes: Tensor, logits_r: Tensor, logits_p: Tensor, gain: Tensor, nz: Tensor,
                       window: int) -> Tensor:
    """a = f + c (see the module docstring): codes [B, T, F], logits_r and logits_p [B*T, F],
    gain [F], nz = nonzero_flat(codes) -> [B, T, F]."""
    return _CarryCoefficients.apply(codes, logits_r, logits_p, gain, nz, window)
