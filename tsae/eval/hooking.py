"""Running a model with an SAE in the loop: the one mechanism under splice, interventions and faithfulness.

At a residual hook L the model's activation x [B, T, d] is replaced by

    x' = decode(edit(c)) + e,        c = encode(x),    e = x - decode(c)  (kept)  or  0  (dropped)

over whole sequences (every SAE is causal in T, so a temporal SAE sees its real context).  With no edit
and the error kept, x' == x in value, while gradients still reach the codes c: the
"x_hat + (x - x_hat).detach()" trick.  Positions before `skip` (e.g. a BOS attention sink) always keep
the clean residual, so every metric is about positions >= skip only.

Models: anything with a TransformerLens `TransformerBridge` at `.bridge` (a `LoadedModel`), or a
bridge itself.  SAEs: anything honouring `tsae.models.base.SAE` (encode/decode on [B, T, d]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Replace = Callable[[Tensor], Tensor]  # x [B, T, d] at the hook -> x' [B, T, d]


def bridge_of(model):
    """The TransformerBridge of a LoadedModel (or the bridge itself)."""
    return getattr(model, "bridge", model)


def model_device(model) -> torch.device:
    return next(bridge_of(model).parameters()).device


def sae_dtype(sae) -> torch.dtype:
    return next(sae.parameters()).dtype


def forward(model, tokens: Tensor, hook: str, replace: Replace | None = None,
            capture: dict[str, Tensor] | None = None) -> Tensor:
    """Logits [B, T, V] with the activation at `hook` replaced by `replace(x)` (None: untouched).

    `capture["x"]` receives the clean activation at the hook (before replacement, detached).
    Gradient mode is the caller's: wrap in `torch.no_grad()` unless gradients are wanted.
    """
    def fn(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001 (TransformerLens passes the hook point)
        if capture is not None:
            capture["x"] = act.detach()
        if replace is None:
            return act
        return replace(act).to(act.dtype)

    return bridge_of(model).run_with_hooks(tokens, fwd_hooks=[(hook, fn)], return_type="logits")


def keep_prefix(x: Tensor, x_new: Tensor, skip: int) -> Tensor:
    """x_new with positions < skip restored to x (the clean residual)."""
    if skip <= 0:
        return x_new
    return torch.cat([x[:, :skip].to(x_new.dtype), x_new[:, skip:]], dim=1)


def splice(sae, *, keep_error: bool = False, edit: Callable[[Tensor], Tensor] | None = None,
           skip: int = 0) -> Replace:
    """The replacement x -> decode(edit(encode(x))) (+ x - decode(encode(x)) when keep_error)."""
    def replace(x: Tensor) -> Tensor:
        xs = x.to(sae_dtype(sae))
        codes = sae.encode(xs)
        x_hat = sae.decode(codes)
        new = sae.decode(edit(codes)) if edit is not None else x_hat
        if keep_error:
            new = new + (xs - x_hat).detach()
        return keep_prefix(xs, new, skip)

    return replace


def constant(x_new: Tensor, skip: int = 0) -> Replace:
    """Replace the activation by a precomputed tensor (e.g. an SAE's x_hat, or zeros)."""
    return lambda x: keep_prefix(x, x_new.to(x.device), skip)


# ---- per-token losses ---------------------------------------------------------------------------
def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy [B, T-1] of predicting tokens[:, t+1] from logits[:, t] (nats, float32)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1)


def kl_per_token(logp_ref: Tensor, logits: Tensor, p_ref: Tensor | None = None) -> Tensor:
    """KL(p_ref || p) [B, T] in nats, from reference log-probs (and their exp, if at hand) and new logits."""
    logp = logits.float().log_softmax(-1)
    p_ref = logp_ref.exp() if p_ref is None else p_ref
    return (p_ref * (logp_ref - logp)).sum(-1).clamp(min=0.0)
