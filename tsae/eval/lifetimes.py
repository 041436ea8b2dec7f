"""Feature lifetimes: how long a latent stays on once it fires, with censoring handled.

A *run* is a maximal interval of consecutive positions on which a latent is active (code > 0); its
length is the latent's lifetime for that occurrence.  Runs come from `tsae.models.lifecycle.runs`,
births/deaths from `lifecycle.births` / `lifecycle.deaths`, on positions >= skip of each sequence.

Censoring.  A run that reaches the last position of a sequence is *right-censored*: its true length
is >= the observed length l, so it is known to have lasted past l - 1 (and may or may not end at l).
Dropping such runs biases lifetimes short (long runs are the likeliest to touch the end), so
lifetimes use the discrete Kaplan-Meier estimator:

    d_j  = completed runs of length j
    n_j  = completed runs of length >= j  +  censored runs of observed length >= j + 1   (at risk at j)
    S(l) = prod_{j <= l} (1 - d_j / n_j)             = P(lifetime > l)
    mean = sum_{l = 0}^{L-1} S(l)                     (restricted to L = max_len; S(0) = 1)
    median / p90 = the smallest l with S(l) <= 0.5 / 0.1   (NaN if S never falls that far)

Runs longer than L are treated as censored at L + 1 (known to outlast L).  With `drop_first_run`
the run active at the first evaluated position is dropped (left-truncated: it began before the
sequence did, e.g. mid-document); by default the first position is a genuine start (sequences start
at a document start, and a temporal SAE has no context before it either).

Per latent: KM mean / median / p90 and max of run length, births and deaths per 1,000 tokens, duty
cycle (fraction of tokens active), duty cycle inside the sequences where it fires, bursts (runs) per
sequence where it fires, and P(length = 1) = d_1 / n_1.  A latent is *single-token* when it has at
least `min_runs` runs and P(length = 1) >= 0.9.  Per model: pooled KM over all runs, the pooled
run-length histogram (completed and censored), the survival curve, and per-latent (firing rate,
mean lifetime) arrays for a lifetime-vs-frequency plot.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsae.models.lifecycle import births, deaths, runs

SINGLE_TOKEN_P1 = 0.9


def kaplan_meier(done: Tensor, censored: Tensor) -> tuple[Tensor, Tensor]:
    """Survival S(l) = P(length > l) for l = 1..L, and the hazard at l, from histograms [..., L+1].

    done[..., l-1]     completed runs of length l (l = 1..L); done[..., L] runs longer than L
    censored[..., l-1] censored runs of observed length l;   censored[..., L] longer than L
    """
    L = done.shape[-1] - 1
    done, censored = done.double(), censored.double()
    d = done[..., :L]  # deaths at l = 1..L
    c = censored.clone()
    c[..., L] += done[..., L]  # outlasted L: censored at observed length L + 1
    ge = lambda h: h.flip(-1).cumsum(-1).flip(-1)  # noqa: E731  (count with length >= index)
    # at risk at j: completed with length >= j, censored with observed length >= j + 1
    at_risk = ge(d) + ge(c)[..., 1:]
    hazard = torch.where(at_risk > 0, d / at_risk.clamp(min=1), torch.zeros_like(d))
    return (1 - hazard).cumprod(-1), hazard


def km_summary(survival: Tensor) -> dict[str, Tensor]:
    """Restricted mean, median and p90 of the length from S(l), l = 1..L (last dim)."""
    L = survival.shape[-1]
    mean = 1 + survival[..., :L - 1].sum(-1)  # S(0) = 1

    def quantile(level: float) -> Tensor:
        below = survival <= level
        first = below.float().argmax(-1) + 1
        nan = torch.full_like(first, float("nan"), dtype=torch.double)
        return torch.where(below.any(-1), first.double(), nan)

    return {"mean": mean, "median": quantile(0.5), "p90": quantile(0.1)}


class LifetimeStats:
    """Streaming run-length, birth/death and duty-cycle statistics of one SAE's codes."""

    def __init__(self, d_sae: int, max_len: int = 128, *, drop_first_run: bool = False, min_runs: int = 5):
        self.F, self.L = d_sae, max_len
        self.drop_first_run, self.min_runs = drop_first_run, min_runs
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.done, self.cens = z(d_sae, max_len + 1), z(d_sae, max_len + 1)
        self.len_done, self.max_seen = z(d_sae), z(d_sae)
        self.fires, self.births, self.deaths = z(d_sae), z(d_sae), z(d_sae)
        self.active_seqs, self.runs_in = z(d_sae), z(d_sae)
        self.tokens = 0
        self.seq_tokens_active = z(d_sae)  # tokens of the sequences in which the latent fires

    @torch.no_grad()
    def update(self, codes: Tensor, skip: int = 0) -> None:
        active = (codes[:, skip:] > 0).cpu()
        B, T, F = active.shape
        fires = active.sum((0, 1)).double()
        self.tokens += B * T
        self.fires += fires
        seq_on = active.any(1)  # [B, F]
        self.active_seqs += seq_on.sum(0).double()
        self.seq_tokens_active += T * seq_on.sum(0).double()
        if self.drop_first_run:
            active = active & ~active.int().cumprod(1).bool()  # drop the run active at the first position
        self.births += births(active).sum((0, 1)).double()
        self.deaths += deaths(active).sum((0, 1)).double()
        feature, length, censored = runs(active)
        self.runs_in += torch.bincount(feature, minlength=F).double()
        bins = length.clamp(max=self.L + 1) - 1
        flat = feature * (self.L + 1) + bins
        one = torch.ones_like(flat, dtype=torch.float64)
        self.done.view(-1).index_add_(0, flat[~censored], one[~censored])
        self.cens.view(-1).index_add_(0, flat[censored], one[censored])
        self.len_done.index_add_(0, feature[~censored], length[~censored].double())
        self.max_seen.scatter_reduce_(0, feature, length.double(), reduce="amax")

    def per_feature(self) -> dict[str, Tensor]:
        """Float64 tensors [F] (NaN where a latent never fired)."""
        surv, hazard = kaplan_meier(self.done, self.cens)
        km = km_summary(surv)
        alive = self.fires > 0
        nan = torch.full((self.F,), float("nan"), dtype=torch.float64)
        per_k = 1000.0 / max(self.tokens, 1)
        n_done = self.done.sum(-1)
        n_runs = n_done + self.cens.sum(-1)
        return {
            "firing_rate": self.fires / max(self.tokens, 1),
            "mean_run_length": torch.where(alive, km["mean"], nan),
            "median_run_length": torch.where(alive, km["median"], nan),
            "p90_run_length": torch.where(alive, km["p90"], nan),
            "max_run_length": torch.where(alive, self.max_seen, nan),
            "mean_run_length_completed": torch.where(n_done > 0, self.len_done / n_done.clamp(min=1), nan),
            "p_single_token": torch.where(alive, hazard[:, 0], nan),
            "n_runs": n_runs,
            "censored_fraction": torch.where(n_runs > 0, self.cens.sum(-1) / n_runs.clamp(min=1), nan),
            "births_per_1k": self.births * per_k,
            "deaths_per_1k": self.deaths * per_k,
            "duty_cycle_active_seq": torch.where(alive, self.fires / self.seq_tokens_active.clamp(min=1),
                                                 nan),
            "bursts_per_active_seq": torch.where(alive, self.runs_in / self.active_seqs.clamp(min=1), nan),
        }

    def result(self) -> dict[str, float | list[float]]:
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated")
        pf = self.per_feature()
        alive = self.fires > 0
        mean_alive = lambda v: float(v[alive].mean()) if alive.any() else float("nan")  # noqa: E731
        surv, hazard = kaplan_meier(self.done.sum(0), self.cens.sum(0))
        pooled = km_summary(surv)
        enough = pf["n_runs"] >= self.min_runs
        single = (pf["p_single_token"] >= SINGLE_TOKEN_P1) & enough
        return {
            "tokens": self.tokens,
            "max_len": self.L,
            "mean_run_length": float(pooled["mean"]),
            "median_run_length": float(pooled["median"]),
            "p90_run_length": float(pooled["p90"]),
            "max_run_length": float(self.max_seen.max()),
            "mean_run_length_completed": float(self.len_done.sum() / self.done.sum().clamp(min=1)),
            "median_feature_mean_run_length": float(pf["mean_run_length"][alive].median()) if alive.any()
            else float("nan"),
            "censored_fraction": float(self.cens.sum() / (self.cens.sum() + self.done.sum()).clamp(min=1)),
            "births_per_1k_tokens": mean_alive(pf["births_per_1k"]),
            "deaths_per_1k_tokens": mean_alive(pf["deaths_per_1k"]),
            "onsets_per_1k_tokens_all": float(self.births.sum()) * 1000.0 / self.tokens,
            "duty_cycle": mean_alive(pf["firing_rate"]),
            "duty_cycle_active_seq": mean_alive(pf["duty_cycle_active_seq"]),
            "bursts_per_active_seq": mean_alive(pf["bursts_per_active_seq"]),
            "frac_single_token": float(single.sum() / enough.sum()) if enough.any() else float("nan"),
            "run_length_hist": self.done.sum(0).tolist(),  # lengths 1..L, then > L
            "censored_hist": self.cens.sum(0).tolist(),
            "survival": surv.tolist(),  # P(length > l), l = 1..L
        }
