"""Causal interventions on SAE codes, run through the model, and the temporal reach of an edit.

At the SAE's hook the residual x [B, T, d] is replaced by

    x' = decode(edit(c)) + e,      c = encode(x),  e = x - decode(c)   (the error term, always kept)

so only the edit differs from the clean model.  The codes are encoded once from the clean residuals
(the edit cannot change x at the SAE's own layer, only downstream), and `decode` sees the whole edited
code sequence: for a temporal SAE whose decoder reads earlier codes, an edit at position t also moves
x'_{t+1}, x'_{t+2}, ...; for a static SAE only x'_t moves and the model's own attention carries the edit
forward.  `decoder_reach` separates the two.

The reference for every effect is the same splice with the unedited codes (equal to the clean model
up to float rounding), so an edit that leaves the codes unchanged has an effect of exactly 0.

An `Edit` is codes' = where(mask, value, codes) with mask = (positions) x (features):

    zero_ablate(features)              value 0
    mean_ablate(features, mean_codes)  value mean_codes[i] (mean code over a reference set)
    clamp(features, v)                 value v
    patch(features, source_codes)      value source_codes[b, t, i] (codes of another input, same shape)

positions: None (every position), an int t (that position in every row), a LongTensor [B] (one
position per row) or a bool mask [B, T].

Temporal reach of latent i: at sites (b, t) where i is active, zero-ablate i at t only and measure, at
offsets j = 0..k, KL(p_ref || p_edit) at position t + j and max_v |logit change|; positions before t
must be unaffected (the model and every SAE are causal), which `max_abs_dlogit_before` checks.  Summaries:
reach_centroid = sum_{j>=1} j KL_j / sum_{j>=1} KL_j, and kl_decay_j = KL_j / KL_0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tsae.eval import hooking


@dataclass
class Edit:
    features: Tensor | list[int] | None  # latents edited (None: all)
    value: Tensor | float  # scalar, [F] or [B, T, F]
    positions: Tensor | int | None = None

    def mask(self, codes: Tensor) -> Tensor:
        B, T, F = codes.shape
        dev = codes.device
        fmask = torch.zeros(F, dtype=torch.bool, device=dev)
        if self.features is None:
            fmask[:] = True
        else:
            fmask[torch.as_tensor(self.features, dtype=torch.long, device=dev)] = True
        return position_mask(self.positions, B, T, dev)[..., None] & fmask

    def __call__(self, codes: Tensor) -> Tensor:
        value = torch.as_tensor(self.value, dtype=codes.dtype, device=codes.device)
        return torch.where(self.mask(codes), value, codes)


def position_mask(positions, B: int, T: int, device=None) -> Tensor:
    """Bool [B, T] from None / int / LongTensor [B] / bool [B, T]."""
    if positions is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if isinstance(positions, int):
        m = torch.zeros(B, T, dtype=torch.bool, device=device)
        m[:, positions] = True
        return m
    positions = torch.as_tensor(positions, device=device)
    if positions.dtype == torch.bool:
        return positions.expand(B, T)
    return torch.arange(T, device=device)[None, :] == positions.view(B, 1)


def zero_ablate(features, positions=None) -> Edit:
    return Edit(features, 0.0, positions)


def mean_ablate(features, mean_codes: Tensor, positions=None) -> Edit:
    return Edit(features, mean_codes, positions)


def clamp(features, value: float, positions=None) -> Edit:
    return Edit(features, value, positions)


def patch(features, source_codes: Tensor, positions=None) -> Edit:
    return Edit(features, source_codes, positions)


# ---- running an edit ----------------------------------------------------------------------------
@torch.no_grad()
def encode_tokens(model, tokens: Tensor, hook: str, sae) -> Tensor:
    """The SAE's codes [B, T, F] of the model's activations at `hook` (e.g. the source of a `patch`)."""
    cap: dict[str, Tensor] = {}
    hooking.forward(model, tokens, hook, capture=cap)
    return sae.encode(cap["x"].to(hooking.sae_dtype(sae)))


def run_edit(model, tokens: Tensor, hook: str, sae, edit: Edit | None, skip: int = 0,
             capture: dict[str, Tensor] | None = None) -> Tensor:
    """Logits with x' = decode(edit(c)) + error at the hook (edit None: the unedited reference)."""
    replace = hooking.splice(sae, keep_error=True, edit=edit, skip=skip)
    return hooking.forward(model, tokens, hook, replace, capture=capture)


@torch.no_grad()
def edit_effect(model, tokens: Tensor, hook: str, sae, edit: Edit, *, skip: int = 0,
                answers: tuple[Tensor, Tensor, Tensor] | None = None,
                capture: dict[str, Tensor] | None = None) -> dict[str, Tensor | float]:
    """Effect of `edit` on the model's outputs, against the unedited splice.

    Returns per-position kl [B, T] (KL(p_ref || p_edit)), max_abs_dlogit [B, T], delta_ce (mean change
    of next-token loss over positions >= skip) and, when answers = (position [B], correct [B],
    incorrect [B]) token ids are given, delta_logit_diff [B] = change of logit(correct) - logit(incorrect).
    `capture["x"]` receives the clean activation at the hook.
    """
    ref = run_edit(model, tokens, hook, sae, None, skip, capture).float()
    new = run_edit(model, tokens, hook, sae, edit, skip).float()
    out: dict[str, Tensor | float] = {
        "kl": hooking.kl_per_token(ref.log_softmax(-1), new),
        "max_abs_dlogit": (new - ref).abs().amax(-1),
        "delta_ce": float((hooking.next_token_ce(new[:, skip:], tokens[:, skip:])
                           - hooking.next_token_ce(ref[:, skip:], tokens[:, skip:])).mean()),
    }
    if answers is not None:
        out["delta_logit_diff"] = logit_diff(new, *answers) - logit_diff(ref, *answers)
    return out


def logit_diff(logits: Tensor, position: Tensor, correct: Tensor, incorrect: Tensor) -> Tensor:
    """logit(correct) - logit(incorrect) at each row's decision position, [B]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, position.to(logits.device)]
    return at.gather(-1, correct.view(-1, 1).to(at.device)).squeeze(-1) - \
        at.gather(-1, incorrect.view(-1, 1).to(at.device)).squeeze(-1)


# ---- temporal reach -----------------------------------------------------------------------------
def active_sites(codes: Tensor, feature: int, n: int, *, skip: int = 0, k: int = 0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Up to n random sites (row, t) [S, 2] where `feature` is active, t >= skip, preferring t + k < T."""
    T = codes.shape[1]
    on = codes[:, :, feature] > 0
    on[:, :skip] = False
    room = on.clone()
    room[:, max(T - k, 0):] = False
    pool = (room if room.any() else on).nonzero()
    if len(pool) > n:
        pool = pool[torch.randperm(len(pool), generator=generator)[:n]]
    return pool


@torch.no_grad()
def temporal_reach(model, tokens: Tensor, hook: str, sae, feature: int, sites: Tensor, *, k: int = 8,
                   skip: int = 0, batch_size: int = 16) -> dict[str, list[float] | float | int]:
    """Mean effect of zero-ablating `feature` at one site (row, t) on positions t..t+k (see module doc)."""
    tokens = tokens.to(hooking.model_device(model))
    sums = {key: torch.zeros(k + 1, dtype=torch.float64) for key in ("kl", "dlogit", "decoder")}
    counts = torch.zeros(k + 1, dtype=torch.float64)
    before_max = 0.0
    for start in range(0, len(sites), batch_size):
        chunk = sites[start:start + batch_size]
        rows, t = chunk[:, 0], chunk[:, 1].to(tokens.device)
        batch = tokens[rows.to(tokens.device)]
        edit = zero_ablate([feature], positions=t)
        cap: dict[str, Tensor] = {}
        eff = edit_effect(model, batch, hook, sae, edit, skip=skip, capture=cap)
        dec = decoder_change(sae, cap["x"], edit)
        T = batch.shape[1]
        offs = t[:, None] + torch.arange(k + 1, device=t.device)[None, :]  # [S, k+1]
        ok = (offs < T).cpu()
        offs = offs.clamp(max=T - 1)
        for key, per_pos in (("kl", eff["kl"]), ("dlogit", eff["max_abs_dlogit"]), ("decoder", dec)):
            vals = per_pos.gather(1, offs).double().cpu()
            sums[key] += torch.where(ok, vals, torch.zeros_like(vals)).sum(0)
        counts += ok.double().sum(0)
        before = torch.arange(T, device=t.device)[None, :] < t[:, None]
        if before.any():
            before_max = max(before_max, float(eff["max_abs_dlogit"][before].max()))
    prof = {key: (s / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")) for key, s in sums.items()}
    kl = prof["kl"]
    tail = kl[1:].nan_to_num(0.0)
    offsets = torch.arange(1, k + 1, dtype=torch.float64)
    return {
        "feature": int(feature),
        "n_sites": int(len(sites)),
        "offsets": list(range(k + 1)),
        "kl": kl.tolist(),
        "max_abs_dlogit": prof["dlogit"].tolist(),
        "decoder_delta": prof["decoder"].tolist(),
        "max_abs_dlogit_before": before_max,
        "reach_centroid": float((offsets * tail).sum() / tail.sum()) if tail.sum() > 0 else float("nan"),
        "kl_decay_1": float(kl[1] / kl[0]) if k >= 1 and kl[0] > 0 else float("nan"),
    }


def decoder_change(sae, x: Tensor, edit: Edit) -> Tensor:
    """||decode(edit(c)) - decode(c)|| per position [B, T]: the SAE's own temporal carry of the edit."""
    codes = sae.encode(x.to(hooking.sae_dtype(sae)))
    return (sae.decode(edit(codes)) - sae.decode(codes)).float().norm(dim=-1)
