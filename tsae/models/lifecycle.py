"""Feature lifecycles: births, deaths, ages and runs of sparse codes along a sequence.

A feature is *active* at (b, t) when its code is > 0.  On `active: BoolTensor [B, T, F]`:

    birth[b,t,f] = active[t] & ~active[t-1]        (position 0 counts as a birth when active)
    death[b,t,f] = active[t-1] & ~active[t]        (never at position 0)
    age[b,t,f]   = length of the run of activity ending at t, 0 when inactive
                 = t - max{s <= t : ~active[s]}    (with max over the empty set = -1)
    run          = a maximal interval of consecutive active positions; its length is the
                   feature's *lifetime*.  A run that reaches the last position is *censored*
                   (it may continue past the end, so its length is only a lower bound).

Everything is vectorised (no loops over T): in each feature's row of history the i-th onset pairs
with the i-th offset, which gives runs; ages are a cumulative sum that restarts after every run.

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


def _rows(active: Tensor) -> Tensor:
    """[B, T, F] -> contiguous [B, F, T], so that each feature's history is one row in memory."""
    return active.transpose(1, 2).contiguous()


def _shift(rows: Tensor, step: int) -> Tensor:
    """rows[..., t - step] along the last dim (step = 1: previous, -1: next), False outside."""
    out = torch.zeros_like(rows)
    if step > 0:
        out[..., step:] = rows[..., :-step]
    else:
        out[..., :step] = rows[..., -step:]
    return out


def births(active: Tensor) -> Tensor:
    """Onsets [B, T, F]: active at t and not at t-1 (t = 0 counts when active)."""
    active = _as_active(active)
    prev = torch.zeros_like(active)
    prev[:, 1:] = active[:, :-1]
    return active & ~prev


def deaths(active: Tensor) -> Tensor:
    """Offsets [B, T, F]: active at t-1 and not at t."""
    active = _as_active(active)
    prev = torch.zeros_like(active)
    prev[:, 1:] = active[:, :-1]
    return prev & ~active


def _run_bounds(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Start and end indices (b, f, t) [n, 3] of every run in rows [B, F, T].

    `nonzero` lists indices in row-major order, so within each (b, f) row starts and ends alternate
    and the i-th start belongs to the i-th end.
    """
    starts = (rows & ~_shift(rows, 1)).nonzero()
    ends = (rows & ~_shift(rows, -1)).nonzero()
    return starts, ends


def runs(active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every maximal run of activity: (feature [n] long, length [n] long, censored [n] bool).

    Runs are listed in (b, f, t_start) order; `censored` marks runs that touch the last position.
    """
    active = _as_active(active)
    starts, ends = _run_bounds(_rows(active))
    length = ends[:, 2] - starts[:, 2] + 1
    return ends[:, 1], length, ends[:, 2] == active.shape[1] - 1


def ages(active: Tensor) -> Tensor:
    """Run length so far, LongTensor [B, T, F]: 1 at a birth, +1 per active step, 0 when inactive.

    A cumulative sum with resets: age = active * cumsum_t(active - L), where L carries, at the
    position right after each run, that run's length (so the count restarts at the next birth).
    """
    active = _as_active(active)
    rows = _rows(active)
    starts, ends = _run_bounds(rows)
    after = ends[:, 2] + 1
    done = after < rows.shape[-1]
    step = rows.to(torch.int32)
    step[ends[done, 0], ends[done, 1], after[done]] = -(after - starts[:, 2])[done].to(torch.int32)
    age = step.cumsum(-1, dtype=torch.int32).masked_fill_(~rows, 0)
    return age.long().transpose(1, 2)


def ages_at(active: Tensor, index: tuple[Tensor, Tensor, Tensor], cap: int) -> Tensor:
    """min(age, cap) at selected entries only: index = (b, t, f) [n] each -> LongTensor [n].

    age = the number of consecutive positions t, t-1, ... (at most `cap`) at which feature f of
    sequence b is active.  Costs `cap` gathers of n entries instead of passes over [B, T, F]; the
    TSAE's lifecycle input uses it on the k active features per token.
    """
    b, t, f = index
    _, T, F = active.shape
    flat = active.reshape(-1)  # no padded copy of [B, T, F]: positions before 0 are masked by t >= back
    at = (b * T + t) * F + f  # flat index of (b, t, f); (b, t - j, f) is at - j * F
    run = torch.ones(b.shape, dtype=torch.bool, device=active.device)
    age = torch.zeros(b.shape, dtype=torch.long, device=active.device)
    for back in range(cap):
        run &= (t >= back) & flat[(at - back * F).clamp(min=0)]
        age += run
    return age


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
        # Every run has one birth; every uncensored run ends in one death.
        feature, length, censored = runs(active)
        ones = torch.ones_like(feature)
        self.fire_count.index_add_(0, feature, length)
        self.birth_count.index_add_(0, feature, ones)
        done_f, done_len = feature[~censored], length[~censored]
        self.death_count.index_add_(0, done_f, ones[~censored])
        self.run_count.index_add_(0, done_f, ones[~censored])
        self.run_length_total.index_add_(0, done_f, done_len)
        self.censored_count.index_add_(0, feature[censored], ones[censored])
        bins = done_len.clamp(max=HIST_BINS) - 1
        self.run_hist.view(-1).index_add_(0, done_f * HIST_BINS + bins, ones[~censored])

        fired = torch.zeros(F, dtype=torch.bool, device=feature.device)
        fired[feature] = True
        self.ever_fired |= fired
        self.tokens_since_fired.add_(B * T).masked_fill_(fired, 0)

    @torch.no_grad()
    def reset(self, features: Tensor | None = None) -> None:
        """Forget everything (features=None) or the history of some features (bool mask or
        indices), e.g. after reviving them; tokens_seen is kept in the latter case."""
        for name, buf in self.named_buffers():
            if features is None:
                buf.zero_()
            elif name != "tokens_seen":
                buf[features] = 0

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
