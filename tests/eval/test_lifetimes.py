"""Run lengths with censoring: a planted geometric lifetime distribution is recovered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsae.eval.lifetimes import LifetimeStats, kaplan_meier


def alternating(n_seq, T, F, mean_on, mean_off, seed=0, start_on=False):
    """Each (sequence, latent) alternates off gaps ~ Geom(mean_off) and on runs ~ Geom(mean_on)."""
    rng = np.random.default_rng(seed)
    active = np.zeros((n_seq, T, F), dtype=bool)
    for b in range(n_seq):
        for f in range(F):
            t, on = 0, start_on
            while t < T:
                n = rng.geometric(1 / (mean_on if on else mean_off))
                if on:
                    active[b, t:t + n, f] = True
                t += n
                on = not on
    return torch.from_numpy(active).float()


def test_geometric_lifetimes_are_recovered_despite_censoring():
    codes = alternating(300, 64, 16, mean_on=5.0, mean_off=10.0)
    stats = LifetimeStats(16, max_len=64)
    for i in range(0, 300, 100):  # streaming
        stats.update(codes[i:i + 100])
    r = stats.result()
    assert r["mean_run_length"] == pytest.approx(5.0, rel=0.05)
    assert r["censored_fraction"] > 0.05
    # dropping the censored runs biases the lifetime short
    assert r["mean_run_length_completed"] < 0.95 * r["mean_run_length"]
    # P(L > l) = 0.8^l: median 4 (0.8^4 = 0.41), p90 11 (0.8^11 = 0.086)
    assert r["median_run_length"] == 4 and r["p90_run_length"] == 11
    pf = stats.per_feature()
    assert float(pf["mean_run_length"].mean()) == pytest.approx(5.0, rel=0.05)
    # one onset per on/off cycle of mean length 15 tokens (fewer near the sequence edges)
    assert r["births_per_1k_tokens"] == pytest.approx(1000 / 15, rel=0.1)
    assert r["duty_cycle"] == pytest.approx(5 / 15, rel=0.1)
    assert r["frac_single_token"] == 0.0
    assert sum(r["run_length_hist"]) + sum(r["censored_hist"]) == pytest.approx(float(pf["n_runs"].sum()))


def test_single_token_latents_and_long_runs():
    codes = torch.zeros(20, 32, 3)
    codes[:, 1::4, 0] = 1.0  # latent 0: 8 runs of length 1 per sequence
    codes[:, 4:20, 1] = 1.0  # latent 1: one run of 16, longer than max_len=8
    stats = LifetimeStats(3, max_len=8)
    stats.update(codes)
    pf = stats.per_feature()
    assert pf["mean_run_length"][0] == 1.0 and pf["p_single_token"][0] == 1.0
    assert pf["max_run_length"][1] == 16 and torch.isnan(pf["median_run_length"][1])  # S(8) = 1
    assert pf["mean_run_length"][1] == 8.0  # restricted to max_len
    assert torch.isnan(pf["mean_run_length"][2])  # dead
    r = stats.result()
    assert r["frac_single_token"] == 0.5
    assert pf["bursts_per_active_seq"][0] == 8 and pf["duty_cycle_active_seq"][1] == 0.5


def test_kaplan_meier_hand_example():
    # completed runs of lengths 1, 2, 2; one censored run observed at length 2 (so known > 1)
    done = torch.tensor([1.0, 2.0, 0.0, 0.0])
    cens = torch.tensor([0.0, 1.0, 0.0, 0.0])
    surv, hazard = kaplan_meier(done, cens)
    # at risk at 1: 4 runs, 1 ends -> S(1) = 3/4; at risk at 2: the 2 completed of length 2 (the
    # censored one may or may not end at 2) -> both end, S(2) = 0
    assert hazard[:2].tolist() == [0.25, 1.0]
    assert surv.tolist()[:3] == [0.75, 0.0, 0.0]


def test_drop_first_run_removes_left_truncated_runs():
    codes = torch.zeros(4, 10, 1)
    codes[:, 0:3, 0] = 1.0  # began before the window
    codes[:, 5:7, 0] = 1.0
    keep = LifetimeStats(1, max_len=10)
    keep.update(codes)
    drop = LifetimeStats(1, max_len=10, drop_first_run=True)
    drop.update(codes)
    assert keep.result()["mean_run_length"] == 2.5 and drop.result()["mean_run_length"] == 2.0
    assert drop.per_feature()["births_per_1k"][0] == 100.0
