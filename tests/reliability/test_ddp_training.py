"""Data-parallel training on 2 CPU ranks (gloo on loopback): the 1-process model up to floating-point
summation order, identical ranks, rank-0-only outputs, exact resume, and torchrun through the CLI
surviving a kill -9 of the whole job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    assert_equal,
    cli_env,
    kill_when_checkpointed,
    max_rel_diff,
    run_ranks,
    tiny_store,
    train,
    train_command,
    weights,
)

from pipeline.train_runner import main
from tsae.data.synthetic import generate
from tsae.train.static_trainer import StaticTrainerConfig
from tsae.train.tsae_trainer import TSAETrainerConfig

TOL = 1e-5  # relative (||a - b|| / ||a|| per tensor); measured <= 3e-7 (see docs/training.md)


@pytest.fixture(scope="module")
def data():
    return generate(d=16, n_feat=24, n_seq=64, seq_len=32, seed=2).acts


def tsae_cfg(**kw) -> TSAETrainerConfig:
    """A TSAE with its static TopK pretraining, aux-k on dead latents, k annealing, revivals, and a
    last partial batch in both runs (5 windows in static, 3 in refine: shares 2+3 and 1+2)."""
    static = StaticTrainerConfig(d_sae=64, k=4, k_start=8, n_tokens=40 * 128 + 40, batch_windows=16, window=8,
                                 lr=3e-3, log_every=8, checkpoint_every=10, progress=False,
                                 dead_window_tokens=512)
    base = dict(k=4, distill_tokens=1024, introduce_tokens=2048, refine_tokens=2048 + 48, memory_window=4,
                lstm_hidden=8, lr=2e-3, batch_windows=8, window=16, log_every=4, checkpoint_every=10,
                progress=False, dead_window_tokens=512, revive_every_tokens=512, static=static)
    return TSAETrainerConfig(**{**base, **kw})


def records(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def with_threads(fn, *args):
    """Run fn on one thread, as the spawned ranks and the CLI subprocesses do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n_windows", [8 * 6 + 5, 8 * 6 + 2])  # last batch 5 (shares 1+2+2), 2 (< 3: dropped)
def test_rank_shares_concatenate_to_the_one_process_batches(data, n_windows):
    from tsae.data.windows import WindowBatches

    kw = dict(window=8, batch_size=8, seed=3, n_tokens=n_windows * 8, chunk_seqs=8, buffer_chunks=2)
    one = list(WindowBatches(data, **kw))
    ranks = [list(WindowBatches(data, **kw, rank=r, world_size=3)) for r in range(3)]
    expect = one if n_windows % 8 >= 3 else one[:-1]
    assert [len(WindowBatches(data, **kw, rank=r, world_size=3)) for r in range(3)] == [len(expect)] * 3
    assert all(len(r) == len(expect) for r in ranks)
    for i, batch in enumerate(expect):
        parts = [r[i] for r in ranks]
        assert [len(p) for p in parts] == [len(batch) // 3 + (j >= 3 - len(batch) % 3) for j in range(3)]
        assert torch.equal(torch.cat([p.acts for p in parts]), batch.acts)
        assert torch.equal(torch.cat([p.seq for p in parts]), batch.seq)
    # resume: a rank's loader restarted at global batch 4 continues its own shares
    rest = list(WindowBatches(data, **kw, rank=1, world_size=3).restart(4))
    assert all(torch.equal(a.acts, b.acts) for a, b in zip(rest, ranks[1][4:], strict=True))


def test_two_ranks_train_the_one_process_model(tmp_path, data):
    with_threads(train, {"kind": "tsae", "cfg": tsae_cfg(), "data": data, "out": tmp_path / "one"})
    run_ranks([{"kind": "tsae", "cfg": tsae_cfg(), "data": data, "out": tmp_path / "two"}])
    two = tmp_path / "two"
    for sub in ("static", "."):  # the static pretraining and the TSAE, both data-parallel
        diff = max_rel_diff(weights(tmp_path / "one" / sub), weights(two / sub))  # counts: equal
        assert diff < TOL, (sub, diff)
    assert_equal(load_file(str(two / "rank0.safetensors")), load_file(str(two / "rank1.safetensors")))
    # the same decisions: revivals (rank 0 on the gathered global batch), skipped steps, log steps
    rec1, rec2 = records(tmp_path / "one"), records(two)
    revived = [(r["step"], r["n"]) for r in rec1 if r.get("event") == "revived"]
    assert revived and revived == [(r["step"], r["n"]) for r in rec2 if r.get("event") == "revived"]
    assert [(r.get("event"), r["step"]) for r in rec1] == [(r.get("event"), r["step"]) for r in rec2]
    # logged means are global ones (rank 0 alone writes, once per record)
    for a, b in zip(rec1, rec2, strict=True):
        if "mse" in a:
            assert b["mse"] == pytest.approx(a["mse"], rel=1e-4) and b["tokens"] == a["tokens"]
    assert (two / "checkpoints" / "phase_refine").is_dir()


def test_interrupted_two_rank_run_resumes_exactly(tmp_path, data):
    """Stopped mid-introduce (step 33, after checkpoint 30), then resumed: the uninterrupted weights."""
    cfg = tsae_cfg()
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_ranks([{"kind": "tsae", "cfg": cfg, "data": data, "out": full},
               {"kind": "tsae", "cfg": cfg, "data": data, "out": cut, "stop_at": 33},
               {"kind": "tsae", "cfg": cfg, "data": data, "out": cut, "resume": True}])
    assert any(r.get("event") == "resumed" and r["step"] == 30 for r in records(cut))
    assert_equal(weights(full), weights(cut))
    assert_equal(weights(full / "static"), weights(cut / "static"))


def t_sae_cfg() -> StaticTrainerConfig:
    """The T-SAE: BatchTopK, its running threshold (from step 10), and InfoNCE over 64 of the batch's 112
    pairs; a last partial batch of 5 windows (shares 2+3, so the N / n_r weights differ)."""
    model = {"threshold_start_steps": 10, "threshold_beta": 0.9, "contrastive": 1.0, "contrastive_pairs": 64}
    return StaticTrainerConfig(architecture="t_sae", d_sae=64, k=4, n_tokens=30 * 128 + 40, batch_windows=16,
                               window=8, lr=3e-3, log_every=8, progress=False, dead_window_tokens=256,
                               model_kwargs=model)


def test_two_ranks_train_the_one_process_t_sae(tmp_path, data):
    """Batch-coupled objectives too: the global BatchTopK threshold, the running inference threshold and
    the InfoNCE pairs and negatives are those of the global batch."""
    with_threads(train, {"kind": "static", "cfg": t_sae_cfg(), "data": data, "out": tmp_path / "one"})
    run_ranks([{"kind": "static", "cfg": t_sae_cfg(), "data": data, "out": tmp_path / "two"}])
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert float(one["threshold"]) > 0  # estimated during the run
    diff = max_rel_diff(one, two)
    print(f"t_sae 1 vs 2 ranks: max relative difference {diff:.2e}")
    assert diff < TOL, diff
    rec1, rec2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in rec1] == [r["step"] for r in rec2]
    for a, b in zip((r for r in rec1 if "mse" in r), (r for r in rec2 if "mse" in r), strict=True):
        for term in ("mse", "contrastive", "l0", "threshold"):  # global means, logged by rank 0
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-6), (term, a["step"])


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    return tiny_store(tmp_path_factory.getbasetemp() / "reliability_store", tiny_model)


ARGS = ["--set", "d_sae=64", "--set", "k=8", "--set", "n_tokens=76800", "--set", "batch_windows=32",
        "--set", "window=8", "--set", "lr=0.003", "--set", "checkpoint_every=10", "--set", "log_every=10",
        "--set", "progress=false", "--set", "dead_window_tokens=2000"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills through /proc")
def test_torchrun_cli_killed_and_rerun(store, tmp_path):
    """`torchrun --nproc_per_node=2 -m pipeline.train_runner`: every process of the job SIGKILLed after
    a checkpoint, then the same command again, ends at the 1-process CLI's weights (to tolerance; the
    bitwise resume of 2 ranks is the test above)."""
    out = tmp_path / "two"
    cmd = train_command("--store", str(store.location), "--out", str(out), *ARGS, ranks=2)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    step = kill_when_checkpointed(proc, out)
    assert not (out / "trainer_cfg.json").exists() and 0 < step < 300  # killed mid-training
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"saved {out}"  # rank 0 alone prints
    assert sum(r.get("event") == "resumed" for r in records(out)) == 1
    with_threads(main, ["--store", str(store.location), "--out", str(tmp_path / "one"), *ARGS])
    assert max_rel_diff(weights(tmp_path / "one"), weights(out)) < TOL
    assert [r["step"] for r in records(out) if "event" not in r] == list(range(10, 301, 10))
