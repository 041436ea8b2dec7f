"""Schedule values at known token counts."""

from __future__ import annotations

import math

import pytest

from tsae.train.schedule import Chain, Ramp, Schedule, lr_schedule
from tsae.train.static_trainer import StaticTrainerConfig, static_schedule


def test_ramp_shapes():
    lin, cos, geo = (Ramp(64, 16, 100, 300, s) for s in ("linear", "cosine", "geometric"))
    assert [lin(t) for t in (0, 100, 150, 200, 300, 10**9)] == [64, 64, 52, 40, 16, 16]
    assert cos(200) == pytest.approx(40)
    assert cos(150) == pytest.approx(64 - 48 * (1 - math.cos(math.pi / 4)) / 2)
    assert geo(200) == pytest.approx(32) and geo(150) == pytest.approx(64 * 0.25**0.25)
    with pytest.raises(ValueError):
        Ramp(0, 1, shape="geometric")
    with pytest.raises(ValueError):
        Ramp(0, 1, 5, 2)


def test_lr_warmup_and_decay():
    f = lr_schedule(1e-3, end=1000, warmup_tokens=100, decay_frac=0.2)
    assert [f(t) for t in (0, 50, 100, 500, 800)] == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3])
    assert [f(t) for t in (900, 1000)] == pytest.approx([5e-4, 0])
    g = lr_schedule(1e-3, end=2000, warmup_tokens=0, decay_frac=0.5, start=1000)  # a later phase
    assert [g(t) for t in (1000, 1500, 1750, 2000)] == pytest.approx([1e-3, 1e-3, 5e-4, 0])


def test_chain_picks_latest_started_ramp():
    c = Chain((Ramp(0, 1, 0, 10), Ramp(1, 0.5, 20, 30)))
    assert [c(t) for t in (5, 15, 25, 40)] == pytest.approx([0.5, 1, 0.75, 0.5])


def test_static_schedule_values():
    cfg = StaticTrainerConfig(k=16, k_start=256, k_anneal_frac=0.5, l1=4.0, l1_warm_up_frac=0.1,
                              lr=2e-4, lr_warmup_tokens=1000, lr_decay_frac=0.2, n_tokens=100_000)
    sch = static_schedule(cfg)
    at = {t: sch.at(t) for t in (0, 500, 5_000, 25_000, 50_000, 90_000, 100_000)}
    assert [at[t]["k"] for t in at] == [256, 249, 194, 64, 16, 16, 16]  # 256 (1/16)^(t/50k), rounded
    assert isinstance(at[25_000]["k"], int)
    assert [sch.at(t)["l1"] for t in (0, 5_000, 10_000, 50_000)] == pytest.approx([0, 2, 4, 4])
    assert at[500]["lr"] == pytest.approx(1e-4) and at[50_000]["lr"] == pytest.approx(2e-4)
    assert at[90_000]["lr"] == pytest.approx(1e-4)
    fixed = static_schedule(StaticTrainerConfig(k=16, k_start=0, n_tokens=1000)).at(0)
    assert fixed["k"] == 16


def test_schedule_constants_and_rounding():
    s = Schedule()
    s["auxk"] = 0.03
    s["k"] = Ramp(10, 2, 0, 8)
    assert s.at(3) == {"auxk": 0.03, "k": 7}
