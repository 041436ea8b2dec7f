"""The three-phase TSAE trainer: schedules at phase boundaries, phase logs and checkpoints, revival,
exact resume across phases."""

from __future__ import annotations

import pytest
import torch

from tsae.data.synthetic import generate
from tsae.train.static_trainer import StaticTrainerConfig, train_static
from tsae.train.tsae_trainer import TSAETrainerConfig, train_tsae, tsae_schedule


@pytest.fixture(scope="module")
def data():
    return generate(d=16, n_feat=24, n_seq=64, seq_len=32, seed=2)


@pytest.fixture(scope="module")
def static(data):
    cfg = StaticTrainerConfig(d_sae=32, k=4, n_tokens=20_000, batch_windows=32, window=16, lr=3e-3,
                              progress=False, log_every=1000)
    return train_static(cfg, data.acts).sae


def tiny_cfg(**kw):
    base = dict(k=4, k_start=8, distill_tokens=2048, introduce_tokens=4096, refine_tokens=4096,
                memory_window=4, lstm_hidden=8, lr=2e-3, batch_windows=8, window=16, log_every=4,
                progress=False, dead_window_tokens=10**9)
    return TSAETrainerConfig(**{**base, **kw})


def test_schedule_at_phase_boundaries():
    cfg = TSAETrainerConfig(k=16, k_start=64, distill_tokens=1000, introduce_tokens=2000, refine_tokens=3000,
                            lr=1e-3, lr_warmup_tokens=100, lr_decay_frac=0.5, gate_shape="cosine")
    sch = tsae_schedule(cfg)
    at = {t: sch.at(t) for t in (0, 500, 1000, 1500, 2000, 3000, 4500, 6000)}
    assert [at[t]["gate_open"] for t in at] == pytest.approx([0, 0, 0, 0.14644661, 0.5, 1, 1, 1])
    assert [at[t]["distill"] for t in at] == pytest.approx([1, 1, 1, 0.75, 0.5, 0, 0, 0])
    # k: 64 -> 16 geometric over [0, 3000] (halving every 1500 tokens), then fixed
    assert [at[t]["k"] for t in at] == [64, 51, 40, 32, 25, 16, 16, 16]
    lrs = [sch.at(t)["lr"] for t in (0, 50, 100, 3000, 4500, 6000)]
    assert lrs == pytest.approx([0, 5e-4, 1e-3, 1e-3, 5e-4, 0])


def test_three_phases_logged_and_checkpointed(tmp_path, data, static):
    res = train_tsae(tiny_cfg(), data.acts, static=static, out_dir=tmp_path)
    logs = [r for r in res.records if "event" not in r]
    by_phase = {p: [r for r in logs if r["phase"] == p] for p in ("distill", "introduce", "refine")}
    assert all(by_phase.values())
    assert all(r["coeff/gate_open"] == 0 and r["gate_mean"] == 0 for r in by_phase["distill"])
    assert by_phase["refine"][-1]["coeff/gate_open"] == 1 and by_phase["refine"][-1]["coeff/distill"] == 0
    assert by_phase["refine"][-1]["gate_mean"] > 0
    ks = [r["coeff/k"] for r in logs]
    assert ks[0] > 4 and ks == sorted(ks, reverse=True) and ks[-1] == 4
    # the temporal SAE starts as its static SAE: the first distill steps stay close to the teacher
    assert by_phase["distill"][0]["distill"] < 0.5
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert {"phase_distill", "phase_introduce", "phase_refine"} <= names
    assert res.sae.architecture == "tsae" and res.sae.cfg.k == 4


def test_resume_mid_introduce_is_exact(tmp_path, data, static):
    cfg = tiny_cfg(checkpoint_every=10)
    full = train_tsae(cfg, data.acts, static=static, out_dir=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop(loop, x, out, terms):  # step 33 is in the introduce phase (steps 17-48)
        if loop.state["step"] == 33:
            raise Stop

    with pytest.raises(Stop):
        train_tsae(cfg, data.acts, static=static, out_dir=tmp_path / "cut", callbacks=(stop,))
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_00000030"
    resumed = train_tsae(cfg, data.acts, static=static, out_dir=tmp_path / "cut", resume=tmp_path / "cut")
    a, b = full.sae.state_dict(), resumed.sae.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dead_latents_are_revived(data):
    cfg = StaticTrainerConfig(d_sae=32, k=4, n_tokens=10_000, batch_windows=32, window=16, lr=3e-3,
                              progress=False, log_every=1000)
    dead_static = train_static(cfg, data.acts).sae
    with torch.no_grad():
        dead_static.b_enc[:8] = -1e3  # latents 0..7 can never fire
    cfg = tiny_cfg(k_start=0, dead_window_tokens=1024, revive_every_tokens=1024)
    res = train_tsae(cfg, data.acts, static=dead_static)
    events = [r for r in res.records if r.get("event") == "revived"]
    assert events and events[0]["phase"] == "introduce"
    assert sum(e["n"] for e in events) >= 8
    fired = res.loop.model.lifecycle.fire_count[:8]
    assert (fired > 0).sum() >= 4  # most revived latents fire afterwards
    assert all(torch.isfinite(p).all() for p in res.sae.parameters())


def test_the_distillation_teacher_decodes_sparsely_to_the_dense_result():
    """static_teacher builds x_hat from the k nonzero codes (an embedding bag): the same codes as
    the static SAE at the step's k, and x_hat equal to the dense codes @ W_dec + b_dec up to rounding."""
    from tsae.models.topk import TopKConfig, topk_activation
    from tsae.models.topk import TopKSAE as _TopK
    from tsae.train.tsae_trainer import static_teacher

    sae = _TopK(TopKConfig(d_in=24, d_sae=96, k=8, seed=3)).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(24))
    x = torch.randn(3, 7, 24)
    for k in (8, 5):
        codes, x_hat = static_teacher(sae)(x, {"k": k})
        want = topk_activation(sae.pre_activations(x), k)
        assert torch.equal(codes, want) and ((codes > 0).sum(-1) <= k).all()
        assert torch.allclose(x_hat, want @ sae.W_dec + sae.b_dec, atol=1e-5)
