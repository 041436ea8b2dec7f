"""The shared training loop: exact resume, NaN / spike guard, pickle-free checkpoints, logging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tsae.data.synthetic import generate
from tsae.train.checkpoint import read_state
from tsae.train.loop import LoopConfig, TrainLoop
from tsae.train.schedule import Schedule
from tsae.train.setup import build_sae
from tsae.train.static_trainer import StaticTrainerConfig, static_schedule, train_static


@pytest.fixture(scope="module")
def data():
    return generate(d=16, n_feat=24, n_seq=64, seq_len=32, seed=1)


class Interrupt(Exception):
    pass


def interrupt_at(step):
    def cb(loop, x, out, terms):
        if loop.state["step"] == step:
            raise Interrupt

    return cb


def small_cfg(architecture, **kw):
    base = dict(architecture=architecture, d_sae=32, k=4, k_start=12, k_anneal_frac=0.5, l1=1.0,
                n_tokens=40 * 128, batch_windows=16, window=8, lr=3e-3, lr_warmup_tokens=640,
                log_every=4, checkpoint_every=5, progress=False, dead_window_tokens=256,
                model_kwargs={"threshold_start_steps": 5} if architecture == "t_sae" else {})
    return StaticTrainerConfig(**{**base, **kw})


@pytest.mark.parametrize("architecture", ["topk", "t_sae"])
def test_resume_gives_identical_weights(tmp_path, data, architecture):
    cfg = small_cfg(architecture)
    full = train_static(cfg, data.acts, out_dir=tmp_path / "full")
    with pytest.raises(Interrupt):
        train_static(cfg, data.acts, out_dir=tmp_path / "cut", callbacks=(interrupt_at(23),))
    latest = (tmp_path / "cut" / "checkpoints" / "latest").read_text()
    assert latest == "step_00000020"
    assert read_state(tmp_path / "cut" / "checkpoints" / latest)["batches"] == 20
    resumed = train_static(cfg, data.acts, out_dir=tmp_path / "cut", resume=tmp_path / "cut")
    a, b = full.sae.state_dict(), resumed.sae.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.loop.state["step"] == full.loop.state["step"] == 40
    # the interrupted run changed the weights between its checkpoint and the interruption, so the
    # equality above is not trivially the checkpoint's weights
    assert not torch.equal(full.sae.W_dec, build_sae(architecture, 16, 32, 0, k=4).W_dec)
    events = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" for e in events)


def test_checkpoint_files_are_pickle_free(tmp_path, data):
    train_static(small_cfg("topk", n_tokens=10 * 128), data.acts, out_dir=tmp_path)
    ckpts = [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    assert {p.name for p in ckpts} == {"step_00000005", "step_00000010", "phase_topk"}
    for ck in ckpts:
        for f in ck.iterdir():
            assert f.suffix in (".safetensors", ".json"), f
            if f.suffix == ".json":
                json.loads(f.read_text())
            else:
                with safe_open(str(f), "pt") as st:  # parses as safetensors, i.e. not a pickle
                    assert list(st.keys())
    out = sorted(p.name for p in tmp_path.iterdir())
    assert out == ["cfg.json", "checkpoints", "sae_weights.safetensors", "train_log.jsonl",
                   "trainer_cfg.json"]
    tcfg = json.loads((tmp_path / "trainer_cfg.json").read_text())
    assert tcfg["architecture"] == "topk" and tcfg["input_scale"] > 0 and tcfg["final"]["tokens"] == 1280


def _loop(d=16, max_skips=20):
    model = build_sae("topk", d, 32, 0, k=4, dead_window_tokens=10**9)
    cfg = LoopConfig(lr=1e-3, log_every=1000, progress=False, max_consecutive_skips=max_skips,
                     spike_min_history=3)
    return TrainLoop(model, cfg, scale=1.0, device="cpu")


def _batches(data, n, poison=None, value=float("nan")):
    x = torch.from_numpy(data.acts[: n * 4]).reshape(n, 4, 32, -1)
    out = [x[i].clone() for i in range(n)]
    for i in poison or []:
        out[i] = out[i].clone()
        if value != value:
            out[i][0, 3, 2] = value
        else:
            out[i] *= value
    return out


@pytest.mark.parametrize("value,event", [(float("nan"), "skipped_nan"), (float("inf"), "skipped_nan"),
                                         (300.0, "skipped_spike")])
def test_guard_skips_bad_batches(data, value, event):
    clean = _batches(data, 8)
    bad = clean[:5] + _batches(data, 6, poison=[5], value=value)[5:] + clean[5:]
    sch = Schedule()
    sch["lr"] = 1e-3
    ref, guarded = _loop(), _loop()
    ref.run(clean, sch, until_tokens=10**9)
    guarded.run(bad, sch, until_tokens=10**9)
    events = [r for r in guarded.log.records if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [(event, 6)]
    assert guarded.state["skipped"] == 1 and guarded.state["step"] == 9
    for p_ref, p in zip(ref.model.parameters(), guarded.model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p_ref, p)  # the bad step changed nothing: same weights as without it


def test_consecutive_failures_restore_snapshot(data):
    loop = _loop(max_skips=3)
    sch = Schedule()
    sch["lr"] = 1e-3
    batches = _batches(data, 10, poison=[4, 5, 6])
    loop.run(batches, sch, until_tokens=10**9)
    events = [r["event"] for r in loop.log.records if "event" in r]
    assert events == ["skipped_nan"] * 3 + ["restored"]
    assert loop.state["restored"] == 1
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_log_records_carry_the_measurements(data):
    cfg = small_cfg("topk", n_tokens=12 * 128, checkpoint_every=0)
    res = train_static(cfg, data.acts)
    logs = [r for r in res.records if "event" not in r]
    assert [r["step"] for r in logs] == [4, 8, 12]
    assert [r["tokens"] for r in logs] == [512, 1024, 1536]
    for key in ("loss", "mse", "auxk", "l0", "dead_frac", "lr", "coeff/k", "coeff/auxk",
                "tokens_per_s", "loader_wait_s", "skipped"):
        assert key in logs[0], key
    assert "coeff/l1" not in logs[0]  # topk has no L1 coefficient
    # k anneals 12 -> 4 geometrically over the first half (768 tokens); logged k is the last step's
    assert logs[0]["coeff/k"] == round(12 * (4 / 12) ** (384 / 768)) and logs[-1]["coeff/k"] == 4
    k_first = [static_schedule(cfg).at(t)["k"] for t in (0, 128, 256, 384)]
    assert k_first == [12, 10, 8, 7]  # 12 (1/3)^(t/768)
    assert 6 < logs[0]["l0"] <= np.mean(k_first)  # L0 <= k: TopK keeps only positive codes
    assert logs[-1]["l0"] == 4.0
    assert logs[0]["mse"] > logs[-1]["mse"]


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_gradients_is_clip_grad_norm(max_norm):
    """Bitwise the gradients torch's clip_grad_norm_ leaves, both when it clips and when it does not."""
    from tsae.train.loop import clip_gradients

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(30, 7, generator=g)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for ps in (ours, theirs):
        (sum((p * p).sum() for p in ps) * 3.0).backward()
    loss, norm = clip_gradients(ours, torch.tensor(2.5), max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert loss == 2.5 and norm == pytest.approx(float(want), rel=1e-6) and norm > 0.5
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
