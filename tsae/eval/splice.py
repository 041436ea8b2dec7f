"""Downstream loss with the reconstruction spliced into the model (CE and KL scores).

Per batch of whole sequences: ONE clean forward (which also captures x at the hook), ONE zero-ablation
forward, then ONE patched forward per SAE in which x at the hook is replaced by x_hat (positions
>= skip; earlier positions stay clean).  Over the predictions made at positions t >= skip:

    CE_m      = mean next-token cross-entropy of model m (nats/token), m in {clean, sae, zero}
    ce_delta  = CE_sae - CE_clean                          (lower is better; 0 is perfect)
    ce_score  = (CE_zero - CE_sae) / (CE_zero - CE_clean)  ("CE recovered"; 1 is perfect)
    kl_sae    = mean KL(p_clean || p_sae)   (nats/token)    (lower is better)
    kl_score  = (KL_zero - KL_sae) / KL_zero               (1 is perfect)

The scores are ratios of eval-set means (not means of per-batch ratios).  Zero-ablating the residual
stream is an extreme baseline that flatters ce_score, hence ce_delta and kl_sae are always reported.
`keep_error=True` splices x_hat + (x - x_hat), which equals x in value: a sanity check (scores 1 up to
rounding) and the form through which gradients reach the codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsae.eval import hooking

CLEAN, ZERO = "__clean__", "__zero__"  # the two reference forwards (never an SAE name)


class SpliceScorer:
    """Accumulates CE / KL of named spliced reconstructions against one shared clean forward per batch."""

    def __init__(self, model, hook: str, skip: int = 0):
        self.model, self.hook, self.skip = model, hook, skip
        self.ce: dict[str, float] = {}
        self.kl: dict[str, float] = {}
        self.n_ce = 0
        self.n_kl = 0
        self._tokens: Tensor | None = None
        self._logp_clean: Tensor | None = None
        self._p_clean: Tensor | None = None

    @torch.no_grad()
    def begin(self, tokens: Tensor) -> Tensor:
        """Clean and zero-ablation forwards for a batch; returns the clean activation x [B, T, d]."""
        cap: dict[str, Tensor] = {}
        logits = hooking.forward(self.model, tokens, self.hook, capture=cap)
        self._tokens = tokens
        self._logp_clean = logits[:, self.skip:].float().log_softmax(-1)
        self._p_clean = self._logp_clean.exp()
        self.n_ce += tokens[:, self.skip + 1:].numel()
        self.n_kl += tokens[:, self.skip:].numel()
        self._add(CLEAN, logits)
        x = cap["x"]
        self._add(ZERO, self._patched(torch.zeros_like(x)))
        return x

    @torch.no_grad()
    def score(self, name: str, x_hat: Tensor, x: Tensor | None = None) -> Tensor:
        """One patched forward with x_hat at the hook (plus the error x - x_hat if x is given)."""
        if self._tokens is None:
            raise RuntimeError("call begin(tokens) first")
        x_new = x_hat if x is None else x_hat + (x.to(x_hat.dtype) - x_hat)
        logits = self._patched(x_new)
        self._add(name, logits)
        return logits

    def _patched(self, x_new: Tensor) -> Tensor:
        return hooking.forward(self.model, self._tokens, self.hook, hooking.constant(x_new, self.skip))

    def _add(self, name: str, logits: Tensor) -> None:
        s = self.skip
        ce = hooking.next_token_ce(logits[:, s:], self._tokens[:, s:])
        kl = hooking.kl_per_token(self._logp_clean, logits[:, s:], self._p_clean)
        self.ce[name] = self.ce.get(name, 0.0) + float(ce.double().sum())
        self.kl[name] = self.kl.get(name, 0.0) + float(kl.double().sum())

    def result(self) -> dict[str, dict[str, float]]:
        """{name: metrics} for every spliced SAE."""
        ce_clean, ce_zero = self.ce[CLEAN] / self.n_ce, self.ce[ZERO] / self.n_ce
        kl_zero = self.kl[ZERO] / self.n_kl
        out = {}
        for name in self.ce:
            if name in (CLEAN, ZERO):
                continue
            ce, kl = self.ce[name] / self.n_ce, self.kl[name] / self.n_kl
            out[name] = {
                "ce_clean": ce_clean,
                "ce_zero": ce_zero,
                "ce_sae": ce,
                "ce_delta": ce - ce_clean,
                "ce_score": (ce_zero - ce) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
                "kl_sae": kl,
                "kl_zero": kl_zero,
                "kl_score": (kl_zero - kl) / kl_zero if kl_zero > 0 else float("nan"),
            }
        return out


@torch.no_grad()
def splice_scores(model, batches, hook: str, saes: dict, *, skip: int = 0,
                  keep_error: bool = False) -> dict[str, dict[str, float]]:
    """CE / KL scores of several SAEs over an iterable of token batches [B, T] (convenience loop)."""
    scorer = SpliceScorer(model, hook, skip)
    device = hooking.model_device(model)
    for tokens in batches:
        x = scorer.begin(tokens.to(device))
        for name, sae in saes.items():
            xs = x.to(hooking.sae_dtype(sae))
            x_hat = sae.decode(sae.encode(xs))
            scorer.score(name, x_hat, xs if keep_error else None)
    return scorer.result()
