"""Dictionary recovery on synthetic sequences with a planted dictionary (tsae.data.synthetic).

Data: d = 32, 48 unit-norm true features (half persistent, mean run 8 tokens; half single-token),
each active on ~5% of tokens (true L0 ~ 3.2), Gaussian noise 0.05 per dimension, 256 sequences of 64
tokens.  Every SAE has d_sae = 96 (2x the true features) and k = 4 (or an L1 penalty).

Chance level: 96 random unit directions in 32 dimensions give a mean max cosine of ~0.45 to the
true features (computed below), so the thresholds (0.85 - 0.9) demand real recovery.
"""

from __future__ import annotations

import pytest
import torch

from tsae.data.synthetic import generate
from tsae.train.recovery import max_cosines, recovery
from tsae.train.setup import build_sae
from tsae.train.static_trainer import StaticTrainerConfig, train_static
from tsae.train.tsae_trainer import TSAETrainerConfig, train_tsae

TOKENS = 200_000
BASE = dict(d_sae=96, k=4, n_tokens=TOKENS, batch_windows=64, window=16, lr=3e-3, log_every=50,
            progress=False, dead_window_tokens=20_000)
# measured (seed 0, one thread): topk 0.958, relu_l1 0.966, t_sae 0.961, crosscoder 0.889
THRESHOLD = {"topk": 0.9, "relu_l1": 0.9, "t_sae": 0.9, "crosscoder": 0.85}
EXTRA = {"relu_l1": {"l1": 2.0},
         "t_sae": {"model_kwargs": {"threshold_start_steps": 100, "contrastive_pairs": 256}},
         "crosscoder": {"model_kwargs": {"window": 4}}}


@pytest.fixture(scope="module")
def data():
    return generate(d=32, n_feat=48, n_seq=256, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def topk(data):
    return train_static(StaticTrainerConfig(architecture="topk", **BASE), data.acts)


def fvu(sae, acts) -> float:
    x = torch.from_numpy(acts)
    with torch.no_grad():
        x_hat = sae(x).x_hat
    return float((x - x_hat).pow(2).sum() / (x - x.mean((0, 1))).pow(2).sum())


@pytest.mark.parametrize("arch", sorted(THRESHOLD))
def test_untrained_models_fail_the_threshold(data, arch):
    """The thresholds demand learning: each model as initialised (random unit decoder rows) scores
    near chance (~0.45), far below them, and so does any 96 random directions."""
    sae = build_sae(arch, 32, 96, 0, k=4, **EXTRA.get(arch, {}).get("model_kwargs", {}))
    untrained = recovery(data.dictionary, sae.dictionary.detach())["mmcs"]
    rnd = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
    for score in (untrained, float(max_cosines(data.dictionary, rnd).mean())):
        assert 0.3 < score < 0.55 < THRESHOLD[arch] - 0.25, score


@pytest.mark.parametrize("arch", ["topk", "relu_l1", "t_sae", "crosscoder"])
def test_static_style_models_recover(data, topk, arch):
    res = topk if arch == "topk" else train_static(
        StaticTrainerConfig(architecture=arch, **{**BASE, **EXTRA.get(arch, {})}), data.acts)
    rec = recovery(data.dictionary, res.sae.dictionary.detach(), {"persistent": data.persistent})
    assert rec["mmcs"] > THRESHOLD[arch], rec
    assert fvu(res.sae, data.acts) < 0.5


def test_tsae_recovers(data, topk):
    """The TSAE (started from the topk SAE above, 100k more tokens) recovers the dictionary too."""
    cfg = TSAETrainerConfig(k=4, distill_tokens=15_000, introduce_tokens=35_000, refine_tokens=50_000,
                            memory_window=4, lstm_hidden=16, lr=3e-3, batch_windows=32, window=32,
                            log_every=25, progress=False, dead_window_tokens=20_000)
    tsae = train_tsae(cfg, data.acts, static=topk.sae)
    rec = recovery(data.dictionary, tsae.sae.dictionary.detach())
    assert rec["mmcs"] > 0.9, rec  # measured 0.985 (the topk SAE trained 300k tokens: 0.986)
    assert fvu(tsae.sae, data.acts) < 0.5


HARD = dict(d=32, n_feat=48, n_seq=256, seq_len=64, seed=0, rate=0.07, amp_persistent=(0.4, 0.8),
            noise_std=0.1, lifetime_persistent=12)
SAME_BATCHES = dict(batch_windows=16, window=32)  # every arm: 512 tokens per step, same step count
TSAE_PHASES = dict(distill_tokens=30_000, introduce_tokens=90_000, refine_tokens=180_000)


def _hard_case(seed: int = 0):
    """Capacity pressure: true L0 ~ 4.6 > k = 3, persistent features weaker (amplitude 0.4-0.8 vs
    0.5-1.5) and longer-lived (mean run 12).  Equal k, tokens and batch shape for every arm:

      static  a TopK SAE trained 900k tokens from scratch;
      tsae    a TopK SAE trained 600k tokens, then 300k tokens of the three TSAE phases (10/30/60%);
      no_dec  the same TSAE without its temporal decoder (the ablation that locates the gain).

    The static SAE is close to converged here (600k -> 900k tokens adds +0.003..+0.015 persistent
    recovery over seeds 0-3), so the comparison is not against an undertrained baseline.
    """
    hard = {**HARD, "seed": seed} if seed else HARD
    data = generate(**hard)
    x_val = torch.from_numpy(generate(**{**hard, "n_seq": 320}).acts[256:])  # same dictionary, new sequences
    base = {**BASE, **SAME_BATCHES, "k": 3}
    start = train_static(StaticTrainerConfig(**{**base, "n_tokens": 600_000}), data.acts)
    static = train_static(StaticTrainerConfig(**{**base, "n_tokens": 900_000}), data.acts)
    arms = {}
    for name, kwargs in {"tsae": {}, "no_dec": {"use_temporal_decoder": False}}.items():
        cfg = TSAETrainerConfig(k=3, **TSAE_PHASES, memory_window=4, lstm_hidden=16, lr=3e-3, **SAME_BATCHES,
                                log_every=25, progress=False, dead_window_tokens=20_000, model_kwargs=kwargs)
        arms[name] = train_tsae(cfg, data.acts, static=start.sae).sae
    return data, x_val, static.sae, arms


@pytest.fixture(scope="module")
def hard_case():
    return _hard_case()


def test_tsae_reconstructs_held_out_sequences_better_at_equal_k_and_tokens(hard_case):
    """Measured over data seeds 0-3: held-out FVU TSAE 0.234 / 0.230 / 0.239 / 0.221 vs static
    0.262 / 0.257 / 0.268 / 0.249; without the temporal decoder 0.264 / 0.258 (seeds 0, 1)."""
    data, x_val, static, arms = hard_case
    assert fvu(arms["tsae"], x_val.numpy()) < fvu(static, x_val.numpy()) - 0.01


def test_tsae_beats_static_on_persistent_features_at_equal_k(hard_case):
    """The issue's requirement: better recovery of the *persistent* features at equal L0 (k = 3 codes
    per token for both).  TSAE - static, mean max cosine over the persistent features, measured
    over data seeds 0-3: +0.019 / +0.022 / +0.019 / +0.024 (0.966 vs 0.947 at seed 0).  The
    transient features stay level (0.996 vs 0.994).  The gain comes from the temporal decoder, which
    reconstructs through the dictionary rows (carry_decoder.py): without it the TSAE is level with
    the static SAE (+0.004 / +0.001, seeds 0, 1)."""
    data, x_val, static, arms = hard_case
    groups = {"persistent": data.persistent, "transient": ~data.persistent}
    rec = {name: recovery(data.dictionary, sae.dictionary.detach(), groups)
           for name, sae in {"static": static, **arms}.items()}
    assert rec["tsae"]["mmcs/persistent"] - rec["static"]["mmcs/persistent"] > 0.01, rec
    assert rec["tsae"]["mmcs/persistent"] - rec["no_dec"]["mmcs/persistent"] > 0.008, rec
    assert rec["tsae"]["mmcs/transient"] > rec["static"]["mmcs/transient"] - 0.005, rec
