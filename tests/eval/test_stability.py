"""TSS and its controls, the T-SAE smoothness scores and lagged MI, on planted temporal structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsae.data.synthetic import generate
from tsae.eval.stability import CodeTemporalStats, InputStats, StabilityEval, shuffle_index, tss


def planted(lifetime: float, seed: int = 0, rate: float = 0.15):
    """Synthetic sequences with one dictionary (n_feat < d, so the pseudo-inverse recovers codes)."""
    data = generate(n_feat=16, d=32, n_seq=96, seq_len=64, frac_persistent=1.0, lifetime_persistent=lifetime,
                    rate=rate, n_follow_pairs=0, noise_std=0.02, seed=seed)
    return torch.from_numpy(data.acts), torch.from_numpy(data.codes), torch.from_numpy(data.dictionary)


def oracle_encoder(dictionary):
    pinv = torch.linalg.pinv(dictionary)  # [d, n_feat]
    return lambda x: (x @ pinv).masked_fill((x @ pinv) < 0.2, 0.0).relu()


def sticky(encode, decay=0.7):
    """A causal 'temporal' encoder: f_t = max(static_t, decay * f_{t-1}) (persists whatever the input)."""
    def enc(x):
        s = encode(x)
        out = torch.empty_like(s)
        prev = torch.zeros_like(s[:, 0])
        for t in range(s.shape[1]):
            prev = torch.maximum(s[:, t], decay * prev * (decay * prev > 0.2))
            out[:, t] = prev
        return out
    return enc


def run(x, encode, seed=0):
    ev = StabilityEval(encode(x[:1]).shape[-1], seed=seed)
    for i in range(0, len(x), 32):
        xb = x[i:i + 32]
        ev.update(xb, encode(xb), encode)
    return ev.result()


def test_tss_definition_on_a_hand_example():
    codes = torch.zeros(1, 3, 4)
    codes[0, 0, [0, 1]] = 1.0  # A_0 = {0, 1}
    codes[0, 1, [1, 2]] = 2.0  # A_1 = {1, 2}: J = 1/3
    codes[0, 2, [1, 2]] = 0.5  # A_2 = A_1: J = 1
    assert tss(codes) == pytest.approx((1 / 3 + 1) / 2)
    stats = CodeTemporalStats(4)
    stats.update(codes)
    r = stats.result()
    assert r["tss"] == pytest.approx(2 / 3)
    # ||f1 - f0||_1 = 1 + 1 + 2 = 4, ||f2 - f1||_1 = 3; L1 mass of pairs (2 + 4) + (4 + 1) = 11
    assert r["tv_per_token"] == pytest.approx(3.5)
    assert r["code_similarity"] == pytest.approx(1 - 7 / 11)


def test_tss_separates_persistent_from_shuffled_and_transient():
    x, _, D = planted(lifetime=8.0)
    enc = oracle_encoder(D)
    r = run(x, enc)
    xt, _, Dt = planted(lifetime=1.0)
    rt = run(xt, oracle_encoder(Dt))
    assert r["tss"] - r["tss_shuffled"] > 0.3
    assert r["tss"] - rt["tss"] > 0.3
    assert r["tss_kappa"] > 0.5 and abs(rt["tss_kappa"]) < 0.05
    # a static encoder: shuffling the input before encoding == shuffling the codes after
    assert r["tss_shuffled"] == pytest.approx(r["tss_shuffled_codes"], abs=1e-12)
    # the input itself is temporally stable (centred cosine), and not once shuffled
    assert r["input_cos_centered"] - r["input_cos_centered_shuffled"] > 0.3
    assert abs(rt["input_cos_centered"] - rt["input_cos_centered_shuffled"]) < 0.05


def test_shuffled_input_control_exposes_a_sticky_encoder():
    # Transient data, but an encoder that holds codes on: its codes look stable, and still do on a
    # shuffled input (tss_shuffled high), while shuffling its codes destroys the stability.
    x, _, D = planted(lifetime=1.0, rate=0.04)
    r = run(x, sticky(oracle_encoder(D)))
    assert r["tss"] - r["tss_shuffled_codes"] > 0.3
    assert abs(r["tss"] - r["tss_shuffled"]) < 0.05


def test_smoothness_scores_of_white_noise_and_of_persistent_codes():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 64, 8, generator=g) * (torch.rand(64, 64, 8, generator=g) < 0.3)  # iid in time
    s = CodeTemporalStats(8)
    s.update(noise)
    r = s.result()
    for key in ("fft_hf_lf", "var_ratio_1_8", "haar_detail_approx"):
        assert r[key] == pytest.approx(1.0, abs=0.08), key
    assert 0 <= r["mi_bits_lag1"] < 0.005
    _, codes, _ = planted(lifetime=8.0)
    p = CodeTemporalStats(codes.shape[-1])
    p.update(codes)
    q = p.result()
    assert q["fft_hf_lf"] < 0.5 and q["var_ratio_1_8"] < 0.5 and q["haar_detail_approx"] < 0.3
    assert q["mi_bits_lag1"] > q["mi_bits_lag2"] > q["mi_bits_lag8"] > 0
    assert 0 < q["mi_norm_lag1"] < 1
    _, codes_t, _ = planted(lifetime=1.0)
    t = CodeTemporalStats(codes_t.shape[-1])
    t.update(codes_t)
    assert t.result()["mi_bits_lag1"] < 0.1 * q["mi_bits_lag1"]


def test_constant_codes_are_perfectly_smooth_and_lipschitz_is_measured():
    codes = torch.ones(2, 16, 3)
    x = torch.randn(2, 16, 5)
    s = CodeTemporalStats(3)
    s.update(codes, x)
    r = s.result()
    assert r["tss"] == 1.0 and r["code_similarity"] == 1.0 and r["tv_per_token"] == 0.0
    assert r["lipschitz_max"] == 0.0
    s2 = CodeTemporalStats(5)
    s2.update(2 * x.relu(), x)
    r2 = s2.result()
    assert 0 < r2["lipschitz_mean"] <= r2["lipschitz_max"] <= 2.0 + 1e-6


def test_shuffle_index_keeps_the_prefix_and_permutes_the_rest():
    idx = shuffle_index(5, 12, skip=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx[:, :2], torch.tensor([[0, 1]] * 5))
    assert all(sorted(row[2:].tolist()) == list(range(2, 12)) for row in idx)
    assert not torch.equal(idx, torch.arange(12).expand(5, 12))


def test_input_stats_of_white_noise_are_zero():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(32, 64, 16)).astype(np.float32)) + 3.0
    s = InputStats(mean=torch.full((16,), 3.0))
    s.update(x)
    r = s.result()
    assert abs(r["input_cos_centered"]) < 0.02 and r["input_cos"] > 0.9  # raw cosine: the mean dominates
