"""Temporal SAE (architecture "tsae"): a pretrained TopK SAE plus a gated, windowed LSTM memory.

Shapes: x [B, T, d], F = d_sae, h = lstm_hidden, w = window, k = TopK.  For every position t:

  static path (the TopK SAE's maps and weights, copied exactly by `from_static`)
    s_t     = (x_t - b_dec) @ W_enc + b_enc                              [F]
    f^s_t   = TopK_k(ReLU(s_t))                                          [F]
  encoder memory (window_memory.py): the static codes strictly before t
    e_t     = LSTM_enc(P^T f^s_{t-w}, ..., P^T f^s_{t-1})                [h]     P [F, h]
  gates (lstm_gates.py), lifecycle input a_t = min(age of f^s at t-1, w) / w
    g_t     = sigma(e_t @ W_g + b_g + v * a_t) * gate_open               [F]
    tau_t   = e_t @ W_tau                                                [F]
  encoder bridge (bridge.py)
    pre_t   = s_t + lambda * g_t * tau_t                                 [F]     lambda [F], init 0
    f_t     = TopK_k(ReLU(pre_t))                                        the codes
  decoder (carry_decoder.py): the static dictionary, applied to the codes plus carried ones
    mu_t    = (1/w) sum_{j<w} f_{t-j}                                    [F]     window mean of codes
    d_t     = LSTM_dec(Q^T f_{t-w+1}, ..., Q^T f_t)                      [h]     Q [F, h]
    r_t     = sigma(d_t @ W_r + b_r)                                     [F]     carry gates
    p_t     = ReLU(d_t @ W_p + b_p)                                      [F]     predicted codes
    c_t     = gate_open * rho * (r_t * mu_t + p_t) * 1[f_t <= 0]         [F]     rho [F], init 0
    x_hat_t = (f_t + c_t) @ W_dec + b_dec                                [d]

Receptive fields: f_t reads x_{t-w..t}; x_hat_t reads x_{t-2w+1..t} (its window of codes, each of
which reads w back).  Both are causal.  L0 counts the codes f_t; c_t is a function of the codes in
the window, adds no information per token, and its size is logged (`carried`).

Because the encoder memory reads the *static* codes, which need no recurrence, the whole sequence
trains in parallel (no T sequential TopKs).

Exact static limit: while gate_open == 0 the temporal terms are not computed at all, so codes and
x_hat are bitwise those of the static TopK SAE with the same weights.  With the bridges at their
init (lambda = rho = 0) the model is also static with the gates open.

Training coefficients (coeffs, all optional; the trainer should call `set_coeffs(coeffs)` before
`forward`, else `loss_terms` re-runs the forward with them):
    gate_open  in [0, 1]  how open the temporal path is (stored in a buffer, saved with the model)
    k          TopK for this step (annealing); not saved: a loaded model uses cfg.k
    auxk       aux-k weight (default cfg.auxk), against latents dead for cfg.dead_window_tokens
    distill    weight of ||f - f_teacher||^2 + ||x_hat - x_hat_teacher||^2 (default cfg.distill)
               teacher = out.aux["teacher_codes"/"teacher_x_hat"] if the trainer put a frozen
               static SAE's outputs there, else this model's own static path (detached)
    gate_l1    weight of the mean encoder gate value (default cfg.gate_l1)
loss = mse + auxk * L_aux + distill * L_distill + gate_l1 * mean(g);  mse as for static SAEs
(mean over tokens of the sum over d).

Ablations (cfg flags): use_lstm (False: tanh(linear(window mean))), use_gates (False: g = gate_open),
use_bridge (False: lambda = rho = 1 fixed), use_lifecycle_input, window, use_temporal_decoder.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tsae.models.base import SAEOutput
from tsae.models.bridge import Bridge
from tsae.models.carry_decoder import CarryDecoder
from tsae.models.lifecycle import LifecycleTracker
from tsae.models.lstm_gates import TemporalGates, lifecycle_input
from tsae.models.registry import register
from tsae.models.static import reconstruction_mse
from tsae.models.topk import KSparseSAE, TopKConfig, TopKSAE, topk_activation
from tsae.models.window_memory import WindowMemory, nonzero_flat


@dataclass
class TSAEConfig(TopKConfig):
    window: int = 16
    lstm_hidden: int = 32  # chosen by bench/tsae_cost.py + bench/tsae_hidden.py, see docs/architecture.md
    use_lstm: bool = True
    use_gates: bool = True
    use_bridge: bool = True
    use_lifecycle_input: bool = True
    use_temporal_decoder: bool = True
    distill: float = 0.0  # default coefficients when coeffs omit them
    gate_l1: float = 0.0


@register
class TemporalSAE(KSparseSAE):
    architecture = "tsae"
    config_class = TSAEConfig
    is_temporal = True
    format_version = 2  # 2: the decoder carries codes through W_dec (was: a dense d_t @ C)

    def __init__(self, cfg: TSAEConfig):
        super().__init__(cfg)
        F, d, h, w = cfg.d_sae, cfg.d_in, cfg.lstm_hidden, cfg.window
        memory = dict(hidden=h, window=w, use_lstm=cfg.use_lstm, code_scale=1 / math.sqrt(d))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.enc_memory = WindowMemory(F, include_current=False, **memory)
            self.gates = TemporalGates(F, h, use_gates=cfg.use_gates,
                                       use_lifecycle_input=cfg.use_lifecycle_input)
            self.bridge = Bridge(F, learned=cfg.use_bridge, decoder=cfg.use_temporal_decoder)
            if cfg.use_temporal_decoder:
                self.carry = CarryDecoder(F, **memory)
        self.register_buffer("gate_open", torch.zeros(()))
        self.lifecycle = LifecycleTracker(F)

    @classmethod
    def from_static(cls, static: TopKSAE, **overrides) -> TemporalSAE:
        """A TSAE whose static path is `static` (weights and firing statistics copied exactly)."""
        if not isinstance(static, TopKSAE):
            raise TypeError(f"the TSAE starts from a TopKSAE, got {type(static).__name__}")
        base = {f.name: getattr(static.cfg, f.name) for f in dataclasses.fields(static.cfg)}
        cfg = TSAEConfig(**{**base, **overrides})
        if (cfg.d_in, cfg.d_sae) != (static.cfg.d_in, static.cfg.d_sae):
            raise ValueError("from_static cannot change d_in or d_sae")
        model = cls(cfg).to(static.W_enc.device)
        _, unexpected = model.load_state_dict(static.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"unexpected static weights: {unexpected}")
        return model

    STATIC_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")

    def static_parameters(self) -> list[nn.Parameter]:
        """The TopK SAE's parameters (e.g. for a separate lr, or to freeze them)."""
        return [getattr(self, n) for n in self.STATIC_PARAMS]

    def temporal_parameters(self) -> list[nn.Parameter]:
        """Everything the static SAE does not have: memories, gates, bridges."""
        return [p for n, p in self.named_parameters() if n not in self.STATIC_PARAMS]

    # ---- schedule ----------------------------------------------------------------------------
    def set_coeffs(self, coeffs: dict[str, float]) -> None:
        """Apply the step's gate_open and k before forward (k falls back to cfg.k when absent)."""
        if "gate_open" in coeffs:
            self.gate_open.fill_(self._gate_value(coeffs["gate_open"]))
        super().set_coeffs(coeffs)

    def _gate_value(self, gate: float) -> float:
        """gate clamped to [0, 1] and rounded to the buffer's dtype, exactly as stored."""
        return float(torch.tensor(min(max(float(gate), 0.0), 1.0), dtype=self.gate_open.dtype))

    @property
    def temporal_open(self) -> bool:
        return bool(self.gate_open > 0)

    # ---- the maps ----------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """-> (codes f, pre-activations pre, static codes f^s, sigma(gate logits) or None)."""
        k, cfg = self.k, self.cfg
        s = self.pre_activations(x)
        f_s = topk_activation(s, k)
        if not self.temporal_open:
            return f_s, s, f_s, None
        nz = nonzero_flat(f_s)  # found once for the memory and the lifecycle input
        e = self.enc_memory(f_s, nz)
        life = lifecycle_input(f_s, cfg.window, nz) if cfg.use_gates and cfg.use_lifecycle_input else None
        gate, tau = self.gates(e, self.bridge.encoder_gain(self.gate_open), life)
        pre = self.bridge.encoder(s, gate, tau)
        return topk_activation(pre, k), pre, f_s, gate

    def encode(self, x: Tensor) -> Tensor:
        return self._encode(x)[0]

    def coefficients(self, codes: Tensor) -> Tensor:
        """a = f + c [B, T, F]: the codes plus what the temporal decoder carries (codes when shut)."""
        if not (self.cfg.use_temporal_decoder and self.temporal_open):
            return codes
        return self.carry(codes, self.bridge.decoder_gain(self.gate_open))

    def carried(self, codes: Tensor) -> Tensor | None:
        """c [B, T, F], the coefficients the temporal decoder adds to `codes` (None when shut)."""
        a = self.coefficients(codes)
        return None if a is codes else a - codes

    def decode(self, codes: Tensor) -> Tensor:
        return super().decode(self.coefficients(codes))

    def forward(self, x: Tensor) -> SAEOutput:
        codes, pre, f_s, g = self._encode(x)
        aux = {"pre": pre, "static_codes": f_s, "gate_open": self.gate_open.clone(), "k": self.k}
        if g is not None:
            aux["gates"] = g  # sigma(gate logits); g_t = gate_open * aux["gates"]
        a = self.coefficients(codes)
        if a is not codes:
            aux["coefficients"] = a  # f + c; the carried part c = a - f
        return SAEOutput(x_hat=super().decode(a), codes=codes, aux=aux)

    # ---- training ----------------------------------------------------------------------------
    def _stale(self, out: SAEOutput, coeffs: dict[str, float]) -> bool:
        """Did `out` come from a forward with other gate_open / k than coeffs asks for?"""
        gate = coeffs.get("gate_open")
        if gate is not None and self._gate_value(gate) != float(out.aux["gate_open"]):
            return True
        k = coeffs.get("k")
        return k is not None and int(k) != int(out.aux["k"])

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        if self._stale(out, coeffs):
            warnings.warn("TemporalSAE: call set_coeffs(coeffs) before forward; re-running the forward "
                          "with this step's gate_open/k", stacklevel=2)
            self.set_coeffs(coeffs)
            out = self(x)
        cfg = self.cfg
        codes, _, terms = self.sparse_terms(x, out, coeffs)  # mse, aux-k, l0, dead_frac (as TopK's)
        if self.training:
            self.lifecycle.update(codes)
        zero = terms["mse"].new_zeros(())
        w_distill = float(coeffs.get("distill", cfg.distill))
        distill = self._distill(out) if w_distill else zero
        sig = out.aux.get("gates")  # sigma(...) without the gate_open factor
        w_gate = float(coeffs.get("gate_l1", cfg.gate_l1))
        if sig is None:
            gate_l1, gate_mean = zero, out.aux["gate_open"] * self.temporal_open
        else:
            gate_l1 = out.aux["gate_open"] * (sig if w_gate else sig.detach()).mean()
            gate_mean = gate_l1.detach()
        loss = (terms["mse"] + float(coeffs.get("auxk", cfg.auxk)) * terms["auxk"] + w_distill * distill
                + w_gate * gate_l1)
        return {"loss": loss, **terms, "distill": distill, "gate_l1": gate_l1, "gate_mean": gate_mean,
                **self._carry_stats(out, codes)}

    @staticmethod
    def _carry_stats(out: SAEOutput, codes: Tensor) -> dict[str, Tensor]:
        """On the batch's first sequence (a logged diagnostic, kept cheap): carried = features per
        token the decoder adds with strength > 1% of the mean code; carry_share = the carried
        coefficients' share of all coefficients.  Both 0 while the decoder is shut."""
        coefficients = out.aux.get("coefficients")
        if coefficients is None:
            return {"carried": codes.new_zeros(()), "carry_share": codes.new_zeros(())}
        codes = codes[0].detach()
        a = (coefficients[0].detach() - codes).abs()
        code_sum, carry_sum = codes.sum(), a.sum()
        mean_code = code_sum / (codes > 0).sum().clamp(min=1)
        return {"carried": (a > 0.01 * mean_code).sum() / a[..., 0].numel(),
                "carry_share": carry_sum / (code_sum + carry_sum).clamp(min=1e-12)}

    def _distill(self, out: SAEOutput) -> Tensor:
        teacher_codes = out.aux.get("teacher_codes")
        if teacher_codes is None:
            teacher_codes = out.aux["static_codes"].detach()
        teacher_x_hat = out.aux.get("teacher_x_hat")
        if teacher_x_hat is None:
            teacher_x_hat = super().decode(teacher_codes).detach()
        return reconstruction_mse(teacher_codes, out.codes) + reconstruction_mse(teacher_x_hat, out.x_hat)

    @torch.no_grad()
    def revive_dead(self, mask: Tensor, x_sample: Tensor, encoder_scale: float = 1.0) -> int:
        """Point dead latents at what the model reconstructs worst; returns how many were revived.

        For each latent in `mask` (bool [F] or indices), a token of x_sample [B, T, d] is drawn
        with probability proportional to its squared reconstruction error; the latent's decoder row
        becomes that token's residual direction (at the alive rows' mean norm), its encoder column
        the same direction (tied, at encoder_scale x the alive columns' mean norm), b_enc = 0, and
        its temporal parameters return to their closed init (lambda = rho = 0, b_g = b_r = v = 0,
        b_p = -1).  Its firing
        and lifecycle history are reset.  The trainer should also reset the optimiser state of the
        revived rows.
        """
        idx = mask.nonzero().flatten() if mask.dtype == torch.bool else mask.flatten()
        n = idx.numel()
        if n == 0:
            return 0
        x = x_sample.to(self.W_enc)
        residual = (x - self(x).x_hat).reshape(-1, self.cfg.d_in)
        err = residual.pow(2).sum(-1)
        pick = torch.multinomial(err / err.sum(), n, replacement=n > err.numel())
        dirs = residual[pick] / residual[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=idx.device)
        alive[idx] = False
        dec_norm = self.W_dec[alive].norm(dim=-1).mean() if alive.any() else 1.0
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else 1.0
        self.W_dec[idx] = dirs * dec_norm
        self.W_enc[:, idx] = dirs.T * (enc_norm * encoder_scale)
        self.b_enc[idx] = 0.0
        if self.cfg.use_bridge:
            self.bridge.lam[idx] = 0.0
            if self.cfg.use_temporal_decoder:
                self.bridge.rho[idx] = 0.0
        if self.cfg.use_temporal_decoder:
            self.carry.b_r[idx] = 0.0
            self.carry.b_p[idx] = -1.0
        if self.cfg.use_gates:
            self.gates.b_g[idx] = 0.0
            if self.cfg.use_lifecycle_input:
                self.gates.v[idx] = 0.0
        self.activity.reset(idx)
        self.lifecycle.reset(idx)
        return n
