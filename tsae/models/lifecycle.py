"""Feature lifecycles: births, deaths, ages and runs of sparse codes along a sequence.

A feature is *active* at (b, t) when its code is > 0.  On `active: BoolTensor [B, T, F]`:

    birth[b,t,f] = active[t] & ~active[t-1]        (position 0 counts as a birth when active)
    death[b,t,f] = active[t-1] & ~active[t]        (never at position 0)
    age[b,t,f]   = length of the run of activity ending at t, 0 when inactive
                 = t - max{s <= t : ~active[s]}    (with max over the empty set = -1)
    run          = a maximal interval of consecutive active positions; its length is the
                   feature's *lifetime*.  A run that reaches the last position is *censored*
                   (it may continue past the end, so its length is only a lower bound).

Everything is vectorised (no loops over T): ages come from a running max of reset positions.

`LifecycleTracker` accumulates these statistics over many batches (per-feature counts, completed
run lengths, a run-length histogram, tokens since a feature last fired) in buffers, so a
checkpoint carries them.  The trainer uses its dead / never-born masks for revival; evaluation
reads `lifetimes()` and `summary()`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

HIST_BINS = 65  # run lengths 1, 2, ..., 64, and ">64"


def _as_active(x: Tensor) -> Tensor:
    """Codes or a boolean mask, [T, F] or [B, T, F] -> bool [B, T, F]."""
    active = x if x.dtype == torch.bool else x > 0
    if active.dim() == 2:
        active = active.unsqueeze(0)
    if active.dim() != 3:
        raise ValueError(f"expected [B, T, F] codes, got shape {tuple(x.shape)}")
    return active


def _previous(active: Tensor) -> Tensor:
    """active shifted one step later in T, False at t = 0."""
    prev = torch.zeros_like(active)
    prev[:, 1:] = active[:, :-1]
    return prev


def births(active: Tensor) -> Tensor:
    """Onsets [B, T, F]: active at t and not at t-1 (t = 0 counts when active)."""
    active = _as_active(active)
    return active & ~_previous(active)


def deaths(active: Tensor) -> Tensor:
    """Offsets [B, T, F]: active at t-1 and not at t."""
    active = _as_active(active)
    return _previous(active) & ~active


def ages(active: Tensor) -> Tensor:
    """Run length so far, LongTensor [B, T, F]: 1 at a birth, +1 per active step, 0 when inactive."""
    active = _as_active(active)
    T = active.shape[1]
    t = torch.arange(T, device=active.device).view(1, T, 1).expand_as(active)
    last_reset = torch.where(active, torch.full_like(t, -1), t).cummax(dim=1).values
    return t - last_reset


def runs(active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every maximal run of activity: (feature [n] long, length [n] long, censored [n] bool).

    Runs are listed in (b, t_end, f) order; `censored` marks runs that touch the last position.
    """
    active = _as_active(active)
    nxt = torch.zeros_like(active)
    nxt[:, :-1] = active[:, 1:]
    ends = active & ~nxt
    _, t_end, feature = ends.nonzero(as_tuple=True)
    length = ages(active)[ends]
    censored = t_end == active.shape[1] - 1
    return feature, length, censored


class LifecycleTracker(nn.Module):
    """Accumulates per-feature lifecycle statistics over batches of sequences.

    Every `update(codes [B, T, F])` treats its B rows as independent sequences (runs do not continue
    across calls).  Buffers (all per feature unless noted):

        tokens_seen []        tokens observed so far (B*T summed over updates)
        fire_count            active tokens
        birth_count           onsets (position 0 counts)        death_count   offsets
        run_count             completed (uncensored) runs        run_length_total   their summed length
        censored_count        runs cut by the end of a sequence  (their length is a lower bound)
        run_hist [F, 65]      completed-run length histogram, bins 1..64 and >64
        tokens_since_fired    tokens since the feature last fired, at update granularity (0 if it
                              fired in the latest update, else += B*T); starts at 0
        ever_fired            bool

    `dead_mask(window)`: not fired in the last `window` tokens (includes never-born ones once
    `window` tokens have been seen).  `never_born_mask()`: never fired at all (after >= 1 update).
    """

    def __init__(self, d_sae: int):
        super().__init__()
        self.d_sae = d_sae
        z = lambda *s: torch.zeros(*s, dtype=torch.long)  # noqa: E731
        self.register_buffer("tokens_seen", z(()))
        for name in ("fire_count", "birth_count", "death_count", "run_count", "run_length_total",
                     "censored_count", "tokens_since_fired"):
            self.register_buffer(name, z(d_sae))
        self.register_buffer("run_hist", z(d_sae, HIST_BINS))
        self.register_buffer("ever_fired", torch.zeros(d_sae, dtype=torch.bool))

    @torch.no_grad()
    def update(self, codes: Tensor) -> None:
        active = _as_active(codes.detach())
        if active.shape[-1] != self.d_sae:
            raise ValueError(f"tracker has d_sae={self.d_sae}, codes have {active.shape[-1]} features")
        active = active.to(self.tokens_seen.device)
        B, T, F = active.shape
        self.tokens_seen += B * T
        fired = active.sum(dim=(0, 1))
        self.fire_count += fired
        self.birth_count += births(active).sum(dim=(0, 1))
        self.death_count += deaths(active).sum(dim=(0, 1))

        feature, length, censored = runs(active)
        done_f, done_len = feature[~censored], length[~censored]
        self.run_count.index_add_(0, done_f, torch.ones_like(done_f))
        self.run_length_total.index_add_(0, done_f, done_len)
        self.censored_count.index_add_(0, feature[censored], torch.ones_like(feature[censored]))
        bins = done_len.clamp(max=HIST_BINS) - 1
        self.run_hist.view(-1).index_add_(0, done_f * HIST_BINS + bins, torch.ones_like(done_f))

        now = fired > 0
        self.ever_fired |= now
        self.tokens_since_fired.add_(B * T).masked_fill_(now, 0)

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()

    # ---- masks -------------------------------------------------------------------------------
    def dead_mask(self, window_tokens: int) -> Tensor:
        """Features that have not fired in the last `window_tokens` tokens."""
        return self.tokens_since_fired >= window_tokens

    def never_born_mask(self) -> Tensor:
        """Features that never fired in any update (all False before the first update)."""
        return ~self.ever_fired & (self.tokens_seen > 0)

    # ---- readouts ----------------------------------------------------------------------------
    def lifetimes(self) -> dict[str, Tensor]:
        """Per-feature float tensors [F] (NaN where undefined)."""
        tokens = self.tokens_seen.clamp(min=1).double()
        runs_ = self.run_count.double()
        nan = torch.full_like(runs_, float("nan"))
        return {
            "mean_lifetime": torch.where(runs_ > 0, self.run_length_total / runs_.clamp(min=1), nan),
            "firing_rate": self.fire_count / tokens,
            "birth_rate": self.birth_count / tokens,
            "death_rate": self.death_count / tokens,
            "censored_fraction": self.censored_count / (runs_ + self.censored_count).clamp(min=1),
        }

    def summary(self, dead_window_tokens: int | None = None) -> dict[str, float | list[int]]:
        """Scalars over features (mean lifetime is token-weighted over completed runs)."""
        total_runs = int(self.run_count.sum())
        per_feature = self.lifetimes()["mean_lifetime"]
        out: dict[str, float | list[int]] = {
            "tokens_seen": int(self.tokens_seen),
            "completed_runs": total_runs,
            "censored_runs": int(self.censored_count.sum()),
            "mean_lifetime": float(self.run_length_total.sum()) / total_runs if total_runs else float("nan"),
            "median_feature_lifetime": float(per_feature.nanmedian()) if total_runs else float("nan"),
            "frac_never_born": float(self.never_born_mask().float().mean()),
            "run_length_hist": self.run_hist.sum(0).tolist(),
        }
        if dead_window_tokens is not None:
            out["frac_dead"] = float(self.dead_mask(dead_window_tokens).float().mean())
        return out
