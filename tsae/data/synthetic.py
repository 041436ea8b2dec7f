"""Sequences of activations with planted temporal structure, for testing what SAEs recover.

A known dictionary D [n_feat, d] with unit rows.  Each feature f runs a semi-Markov on/off process
along every sequence:

    off -> on  with probability p_on[f] per step (a *birth*), or forced by a follow rule;
    a run lasts L ~ lifetime_f steps (geometric with mean m_f, or a given pmf over 1..K);
    during a run the code is a * (1 + jitter * eps_t), with a ~ U(amp) drawn once per run.

    p_on[f] = rate / (m_f (1 - rate)) makes the stationary fraction of active tokens ~= rate for
    every feature, so persistent (m_f > 1) and transient (m_f = 1) features fire equally often and
    differ only in how their activity is arranged in time.

Follow pairs (A, B): when A is born at t, B is born at t+1 with probability `follow_prob` (unless
already on).  Observations:

    x[n, t] = sum_f c[n, t, f] D[f] + noise_std * N(0, I_d)

A burn-in of `burn_in` steps is simulated and discarded, so sequences start in the stationary
regime.  Everything is drawn from one numpy Generator seeded by `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

Lifetime = float | Sequence[float]  # geometric mean, or a pmf over run lengths 1..K


@dataclass
class SyntheticConfig:
    d: int = 32
    n_feat: int = 64
    n_seq: int = 256
    seq_len: int = 64
    frac_persistent: float = 0.5
    lifetime_persistent: Lifetime = 8.0
    lifetime_transient: Lifetime = 1.0
    rate: float = 0.05  # stationary fraction of active tokens per feature (L0 ~= rate * n_feat)
    n_follow_pairs: int = 8
    follow_prob: float = 0.8
    amp: tuple[float, float] = (0.5, 1.5)  # per-run amplitude range (transient features)
    amp_persistent: tuple[float, float] | None = None  # None: same as amp
    jitter: float = 0.1  # per-token multiplicative amplitude noise inside a run
    noise_std: float = 0.05
    burn_in: int = 64
    seed: int = 0


@dataclass
class SyntheticData:
    acts: np.ndarray  # float32 [n_seq, T, d]
    codes: np.ndarray  # float32 [n_seq, T, n_feat], the true sparse codes
    dictionary: np.ndarray  # float32 [n_feat, d], unit rows
    persistent: np.ndarray  # bool [n_feat]
    mean_lifetime: np.ndarray  # float [n_feat], the run-length distribution's mean
    follow_pairs: np.ndarray  # int [n_pairs, 2]: (leader A, follower B)
    config: SyntheticConfig
    meta: dict = field(default_factory=dict)

    @property
    def active(self) -> np.ndarray:
        return self.codes > 0

    def metadata(self) -> dict:
        return {
            "config": asdict(self.config),
            "persistent": np.flatnonzero(self.persistent).tolist(),
            "follow_pairs": self.follow_pairs.tolist(),
            "mean_lifetime": self.mean_lifetime.tolist(),
            **self.meta,
        }


def _lifetime_sampler(spec: Lifetime):
    """(mean, sample(rng, n) -> int array >= 1) for a geometric mean or a pmf over 1..K."""
    if isinstance(spec, int | float):
        if spec < 1:
            raise ValueError(f"mean lifetime must be >= 1, got {spec}")
        p = 1.0 / float(spec)
        return float(spec), lambda rng, n: rng.geometric(p, size=n)
    pmf = np.asarray(spec, dtype=np.float64)
    if pmf.ndim != 1 or (pmf < 0).any() or not np.isclose(pmf.sum(), 1.0):
        raise ValueError("a lifetime pmf must be a 1-d probability vector over lengths 1..K")
    lengths = np.arange(1, len(pmf) + 1)
    return float((lengths * pmf).sum()), lambda rng, n: rng.choice(lengths, size=n, p=pmf)


def random_dictionary(n_feat: int, d: int, rng: np.random.Generator) -> np.ndarray:
    D = rng.standard_normal((n_feat, d))
    return (D / np.linalg.norm(D, axis=1, keepdims=True)).astype(np.float32)


def generate(cfg: SyntheticConfig | None = None, **overrides) -> SyntheticData:
    """Draw a data set (see module doc).  `generate(n_seq=64, seed=3)` overrides config fields."""
    cfg = SyntheticConfig(**{**asdict(cfg or SyntheticConfig()), **overrides})
    if not 0 < cfg.rate < 1:
        raise ValueError("rate must be in (0, 1)")
    rng = np.random.default_rng(cfg.seed)
    F, N, T = cfg.n_feat, cfg.n_seq, cfg.seq_len
    D = random_dictionary(F, cfg.d, rng)

    persistent = np.zeros(F, dtype=bool)
    persistent[rng.permutation(F)[: round(cfg.frac_persistent * F)]] = True
    m_p, sample_p = _lifetime_sampler(cfg.lifetime_persistent)
    m_t, sample_t = _lifetime_sampler(cfg.lifetime_transient)
    mean_life = np.where(persistent, m_p, m_t)
    p_on = np.minimum(cfg.rate / (mean_life * (1 - cfg.rate)), 1.0)
    amp_p = cfg.amp_persistent or cfg.amp
    amp_lo = np.where(persistent, amp_p[0], cfg.amp[0])
    amp_hi = np.where(persistent, amp_p[1], cfg.amp[1])

    pairs = np.zeros((0, 2), dtype=np.int64)
    if cfg.n_follow_pairs:
        picks = np.stack([rng.choice(F, size=2, replace=False) for _ in range(cfg.n_follow_pairs)])
        pairs = np.unique(picks, axis=0)

    remaining = np.zeros((N, F), dtype=np.int64)  # steps left in the current run (0: off)
    amp = np.zeros((N, F))
    forced = np.zeros((N, F), dtype=bool)  # births forced by a leader at the previous step
    codes = np.zeros((N, T, F), dtype=np.float32)
    for t in range(-cfg.burn_in, T):
        off = remaining == 0
        born = off & ((rng.random((N, F)) < p_on) | forced)
        n_p, n_t = born[:, persistent].sum(), born[:, ~persistent].sum()
        life = np.zeros((N, F), dtype=np.int64)
        life_p, life_t = life[:, persistent], life[:, ~persistent]
        life_p[born[:, persistent]] = sample_p(rng, n_p)
        life_t[born[:, ~persistent]] = sample_t(rng, n_t)
        life[:, persistent], life[:, ~persistent] = life_p, life_t
        remaining = np.where(born, life, remaining)
        amp = np.where(born, amp_lo + (amp_hi - amp_lo) * rng.random((N, F)), amp)
        active = remaining > 0
        if t >= 0:
            scale = np.maximum(1 + cfg.jitter * rng.standard_normal((N, F)), 0.05)
            codes[:, t] = np.where(active, amp * scale, 0.0)
        remaining = remaining - active
        forced = np.zeros((N, F), dtype=bool)
        if len(pairs):
            fire = born[:, pairs[:, 0]] & (rng.random((N, len(pairs))) < cfg.follow_prob)
            np.logical_or.at(forced, (slice(None), pairs[:, 1]), fire)

    acts = codes @ D + cfg.noise_std * rng.standard_normal((N, T, cfg.d)).astype(np.float32)
    return SyntheticData(
        acts=acts.astype(np.float32), codes=codes, dictionary=D, persistent=persistent,
        mean_lifetime=mean_life, follow_pairs=pairs, config=cfg,
    )
