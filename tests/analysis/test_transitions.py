import numpy as np
import pytest

from tsae.analysis.transitions import (
    bh_qvalues,
    example_contexts,
    mine_transitions,
    most_frequent,
    onsets,
    permutation_counts,
)
from tsae.data.synthetic import generate

A, B = 3, 7


def planted(seed: int, n_seq=200, T=64, F=40, rate=0.05, lag=2, prob=0.9) -> np.ndarray:
    """Independent Bernoulli(rate) features, plus: B turns on at t+lag w.p. prob whenever A is on at t."""
    rng = np.random.default_rng(seed)
    active = rng.random((n_seq, T, F)) < rate
    fire = active[:, : T - lag, A] & (rng.random((n_seq, T - lag)) < prob)
    active[:, lag:, B] |= fire
    return active


def shuffle_positions(active: np.ndarray, seed: int) -> np.ndarray:
    perm = np.argsort(np.random.default_rng(seed).random(active.shape[:2]), axis=1)
    return np.take_along_axis(active, perm[..., None], axis=1)


def test_planted_pair_is_found_at_its_lag_only():
    stats = mine_transitions(planted(0), lags=(1, 2, 3, 4))
    assert stats.significant_lags(A, B) == [2]
    top = stats.top(n=10)
    assert [(t.A, t.B, t.k) for t in top] == [(A, B, 2)]  # and nothing else among 40 x 39 x 4 tests
    t = top[0]
    # P(B at t+2 | A at t) ~ 0.9 + 0.05 against a base rate of ~0.095: lift ~ 9.
    assert 7 < t.lift < 11 and t.q < 1e-10
    assert t.count == int(stats.count[1, stats.position(A), stats.position(B)])


def test_shuffled_positions_give_no_significant_transitions():
    stats = mine_transitions(shuffle_positions(planted(0), seed=1))
    assert stats.top(n=100, min_count=1) == []
    assert stats.q.min() > 0.05


def test_analytic_null_matches_permutations():
    active = planted(1, n_seq=60, T=32, F=12, rate=0.15)
    stats = mine_transitions(active, lags=(1, 3))
    perm = permutation_counts(active, stats.features, lags=(1, 3), n_perm=200, seed=0)
    # each permutation's count is ~Poisson(E): the mean of 200 is within a few sigma of E
    z = (perm - stats.expected) / np.sqrt(stats.expected / 200)
    assert np.abs(z).max() < 5
    assert abs(perm.sum() / stats.expected.sum() - 1) < 0.005


def test_counts_match_brute_force_and_do_not_depend_on_grouping():
    rng = np.random.default_rng(2)
    active = rng.random((7, 10, 9)) < np.linspace(0.05, 0.6, 9)  # distinct frequencies per feature
    small = mine_transitions(active, lags=(1, 2, 5), top_n=6)  # 7 groups of one sequence
    big = mine_transitions(active, lags=(1, 2, 5), top_n=6, n_groups=2)
    np.testing.assert_array_equal(small.features, most_frequent(active, 6))
    np.testing.assert_array_equal(small.count, big.count)
    np.testing.assert_allclose(small.expected, big.expected)
    for i, k in enumerate((1, 2, 5)):
        for a, fa in enumerate(small.features):
            for b, fb in enumerate(small.features):
                brute = sum(active[s, t, fa] and active[s, t + k, fb]
                            for s in range(7) for t in range(10 - k))
                assert small.count[i, a, b] == brute
    n = active.sum(1).astype(float)  # per-sequence counts [n_seq, F]
    same = np.einsum("stf,stg->fg", active.astype(float), active.astype(float))
    fa, fb = small.features[0], small.features[1]
    expect = (10 - 2) / (10 * 9) * ((n[:, fa] * n[:, fb]).sum() - same[fa, fb])
    assert small.expected[1, 0, 1] == pytest.approx(expect)


def test_explicit_features_and_onsets():
    active = planted(3, n_seq=20, T=16, F=10)
    stats = mine_transitions(active, features=[B, A], lags=(2,))
    assert stats.features.tolist() == [B, A] and stats.count.shape == (1, 2, 2)
    x = np.array([[[1], [1], [0], [1], [1], [1]]], dtype=bool)
    assert onsets(x)[0, :, 0].tolist() == [True, False, False, True, False, False]


def test_synthetic_follow_pairs_and_persistent_features():
    """On E's generator: onsets recover exactly the planted follow pairs at k=1 (and chains A->B->C as
    A->C at k=2); independent persistent features (clumped activity) produce no false transitions,
    only persistence on the diagonal."""
    data = generate(n_seq=256, seq_len=64, n_feat=48, n_follow_pairs=6, seed=0)
    planted = {(a, b, 1) for a, b in data.follow_pairs.tolist()}
    chains = {(a, c, 2) for a, b, _ in planted for b2, c, _ in planted if b == b2}
    assert chains  # this seed has chains (18->15->0, 47->15->0)
    found = mine_transitions(data.active, events="onset").top(n=100, min_count=1)
    assert {(t.A, t.B, t.k) for t in found} == planted | chains

    quiet = generate(n_seq=256, seq_len=64, n_feat=48, n_follow_pairs=0, seed=2)
    stats = mine_transitions(quiet.active, events="active")
    assert stats.top(n=100, min_count=1) == []
    persistent = set(np.flatnonzero(quiet.persistent).tolist())
    diag = stats.persistence(n=1000)
    assert {t.A for t in diag if t.k == 1} >= persistent
    false = [t for t in diag if t.A not in persistent]
    assert len(false) <= 0.1 * len(diag)  # BH at 0.05 within the diagonal family


def test_bh_qvalues_match_definition():
    p = np.random.default_rng(0).random(50) ** 3
    q = bh_qvalues(p)
    order = np.argsort(p)
    m = len(p)
    expect = [min(1.0, min(p[order[j]] * m / (j + 1) for j in range(i, m))) for i in range(m)]
    np.testing.assert_allclose(q[order], expect)


def test_example_contexts_mark_both_positions():
    active = np.zeros((3, 12, 4), dtype=bool)
    active[1, 4, 0] = active[1, 6, 2] = True
    active[2, 0, 0] = active[2, 2, 2] = True
    tokens = [[f" w{s}_{t}" for t in range(12)] for s in range(3)]
    out = example_contexts(active, tokens, A=0, B=2, k=2, n=5, width=1)
    assert [(o["seq"], o["t"]) for o in out] == [(1, 4), (2, 0)]
    assert out[0]["text"] == "… w1_3[[ w1_4]] w1_5{{ w1_6}} w1_7…"
    assert out[1]["text"].startswith("[[ w2_0]] w2_1{{ w2_2}}")
    assert example_contexts(active, tokens, A=0, B=2, k=3) == []


def test_bad_arguments():
    active = np.zeros((2, 5, 3), dtype=bool)
    with pytest.raises(ValueError, match="lags"):
        mine_transitions(active, lags=(5,))
    with pytest.raises(ValueError, match="events"):
        mine_transitions(active, events="birth")
    with pytest.raises(ValueError, match="shape"):
        mine_transitions(active[0])
