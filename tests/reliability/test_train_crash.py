"""Training crashes: `kill -9` mid-run, then the same command again, ends at the uninterrupted weights;
checkpoint and log writes survive a crash at any instant."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import assert_equal, cli_env, kill_when_checkpointed, tiny_store, train_command, weights

from pipeline.train_runner import main
from tsae.train.checkpoint import latest_checkpoint, read_state, save_checkpoint, write_latest
from tsae.train.loop import JsonlLog
from tsae.train.setup import build_sae

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills through /proc")

STEPS = 600  # long enough (~2 s of steps) that the kill lands mid-run
ARGS = ["--set", "d_sae=64", "--set", "k=8", "--set", f"n_tokens={STEPS * 256}", "--set", "batch_windows=32",
        "--set", "window=8", "--set", "lr=0.003", "--set", "checkpoint_every=10", "--set", "log_every=10",
        "--set", "progress=false", "--set", "dead_window_tokens=2000"]


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    return tiny_store(tmp_path_factory.getbasetemp() / "reliability_store", tiny_model)


def run_in_process(args: list[str]) -> None:
    """The CLI in this process on one thread, as the subprocesses run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def log_steps(folder) -> list[int]:
    lines = (folder / "train_log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "event" not in r]


def test_kill_9_then_rerun_gives_the_uninterrupted_weights(store, tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    cmd = train_command("--store", str(store.location), "--out", str(out), *ARGS)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    step = kill_when_checkpointed(proc, out)
    assert proc.returncode == -9
    assert not (out / "trainer_cfg.json").exists() and 0 < step < STEPS  # killed mid-training

    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"saved {out}"
    run_in_process(["--store", str(store.location), "--out", str(ref), *ARGS])
    assert_equal(weights(out), weights(ref))
    # the log reads as one run: cut back to the checkpoint, then continued, plus a "resumed" event
    assert log_steps(out) == log_steps(ref) == list(range(10, STEPS + 1, 10))
    events = [json.loads(line).get("event") for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert events.count("resumed") == 1


def _save(root, name, model, opt, step):
    save_checkpoint(root / name, model, opt, {"step": step})
    write_latest(root, name)


def test_a_crash_mid_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    model = build_sae("topk", 8, 16, 0, k=2)
    opt = torch.optim.Adam(model.parameters())
    root = tmp_path / "checkpoints"
    _save(root, "step_00000010", model, opt, 10)

    import tsae.train.checkpoint as ck

    def crash(*a, **kw):
        raise KeyboardInterrupt  # the process dies while writing the optimiser file

    with monkeypatch.context() as m:
        m.setattr(ck, "_optim_split", crash)
        with pytest.raises(KeyboardInterrupt):
            _save(root, "step_00000020", model, opt, 20)
    assert (root / "step_00000020.tmp").is_dir() and not (root / "step_00000020").exists()
    assert latest_checkpoint(root) == root / "step_00000010"

    # killed between replacing an existing folder and renaming the new one in: `latest` names a
    # missing folder, and the newest complete checkpoint is used instead
    _save(root, "step_00000020", model, opt, 20)
    (root / "step_00000020").rename(root / "step_00000020.old")
    assert latest_checkpoint(root) == root / "step_00000010"
    # a half-written `latest.tmp` is never read
    (root / "latest.tmp").write_text("step_000")
    assert latest_checkpoint(root) == root / "step_00000010"
    _save(root, "step_00000030", model, opt, 30)
    assert latest_checkpoint(root) == root / "step_00000030"
    assert read_state(root / "step_00000030")["step"] == 30


def test_resumed_log_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
    JsonlLog(path).truncate_after(20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    JsonlLog(path).truncate_after(None)
    assert path.read_text() == ""
