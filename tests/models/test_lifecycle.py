"""Lifecycle functions against a brute-force loop, and the tracker's accumulation."""

import torch

from tsae.models.lifecycle import HIST_BINS, LifecycleTracker, ages, ages_at, births, deaths, runs


def _random_active(seed: int, B=3, T=23, F=7, p=0.55) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, F, generator=g) < p


def _brute(active):
    B, T, F = active.shape
    a = active.tolist()
    birth = torch.zeros(B, T, F, dtype=torch.bool)
    death = torch.zeros(B, T, F, dtype=torch.bool)
    age = torch.zeros(B, T, F, dtype=torch.long)
    run_list = []  # (b, t_end, f, length, censored)
    for b in range(B):
        for f in range(F):
            run = 0
            for t in range(T):
                prev = a[b][t - 1][f] if t > 0 else False
                cur = a[b][t][f]
                birth[b, t, f] = cur and not prev
                death[b, t, f] = prev and not cur
                run = run + 1 if cur else 0
                age[b, t, f] = run
                nxt = a[b][t + 1][f] if t + 1 < T else False
                if cur and not nxt:
                    run_list.append((b, t, f, run, t == T - 1))
    run_list.sort(key=lambda r: (r[0], r[2], r[1]))  # (b, f, t)
    return birth, death, age, run_list


def test_pure_functions_match_brute_force():
    for seed, p in [(0, 0.55), (1, 0.1), (2, 0.95)]:
        active = _random_active(seed, p=p)
        birth, death, age, run_list = _brute(active)
        assert torch.equal(births(active), birth)
        assert torch.equal(deaths(active), death)
        assert torch.equal(ages(active), age)
        feature, length, censored = runs(active)
        assert feature.tolist() == [r[2] for r in run_list]
        assert length.tolist() == [r[3] for r in run_list]
        assert censored.tolist() == [r[4] for r in run_list]
        # every active token belongs to exactly one run
        assert int(length.sum()) == int(active.sum())


def test_ages_at_selected_entries_is_capped_age():
    active = _random_active(5, B=2, T=30, F=9, p=0.7)
    g = torch.Generator().manual_seed(0)
    index = tuple(torch.randint(0, n, (50,), generator=g) for n in (2, 30, 9))
    for cap in (1, 3, 8):
        assert torch.equal(ages_at(active, index, cap), ages(active).clamp(max=cap)[index])


def test_codes_are_thresholded_at_zero_and_2d_accepted():
    codes = torch.tensor([[0.0, 1.5], [2.0, 0.0], [0.3, 0.0]])
    assert ages(codes).squeeze(0).tolist() == [[0, 1], [1, 0], [2, 0]]


def test_tracker_accumulates_over_two_updates():
    a1, a2 = _random_active(3, B=2, T=40, F=5, p=0.6), _random_active(4, B=4, T=9, F=5, p=0.6)
    a2[:, :, 4] = False  # feature 4 silent in the second update
    tr = LifecycleTracker(5)
    tr.update(a1.float())
    tr.update(a2)

    runs_all = _brute(a1)[3] + _brute(a2)[3]
    done = [r for r in runs_all if not r[4]]
    assert int(tr.tokens_seen) == 2 * 40 + 4 * 9
    for f in range(5):
        lengths = [r[3] for r in done if r[2] == f]
        assert int(tr.run_count[f]) == len(lengths)
        assert int(tr.run_length_total[f]) == sum(lengths)
        assert int(tr.censored_count[f]) == sum(1 for r in runs_all if r[4] and r[2] == f)
        assert int(tr.birth_count[f]) == int(births(a1)[..., f].sum() + births(a2)[..., f].sum())
        assert int(tr.death_count[f]) == int(deaths(a1)[..., f].sum() + deaths(a2)[..., f].sum())
        hist = torch.zeros(HIST_BINS, dtype=torch.long)
        for n in lengths:
            hist[min(n, HIST_BINS) - 1] += 1
        assert torch.equal(tr.run_hist[f], hist)
        mean = tr.lifetimes()["mean_lifetime"][f]
        assert abs(float(mean) - sum(lengths) / len(lengths)) < 1e-9
    assert tr.tokens_since_fired.tolist() == [0, 0, 0, 0, 36]
    assert tr.dead_mask(36).tolist() == [False] * 4 + [True]
    assert not tr.never_born_mask().any()
    s = tr.summary(dead_window_tokens=36)
    assert s["completed_runs"] == len(done) and abs(s["frac_dead"] - 0.2) < 1e-6
    assert sum(s["run_length_hist"]) == len(done)


def test_never_born_and_long_runs_and_state_dict():
    tr = LifecycleTracker(3)
    assert not tr.never_born_mask().any()  # nothing seen yet
    active = torch.zeros(1, 100, 3, dtype=torch.bool)
    active[0, 0:70, 0] = True  # one completed run of 70 -> ">64" bin
    active[0, 90:, 1] = True  # censored run
    tr.update(active)
    assert tr.never_born_mask().tolist() == [False, False, True]
    assert int(tr.run_hist[0, HIST_BINS - 1]) == 1 and int(tr.censored_count[1]) == 1
    tr.reset(torch.tensor([True, False, False]))
    assert int(tr.run_count[0]) == 0 and int(tr.censored_count[1]) == 1 and int(tr.tokens_seen) == 100
    tr2 = LifecycleTracker(3)
    tr2.load_state_dict(tr.state_dict())
    assert torch.equal(tr2.run_hist, tr.run_hist) and torch.equal(tr2.ever_fired, tr.ever_fired)
