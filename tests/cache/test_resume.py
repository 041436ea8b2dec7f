"""Interrupted builds resume exactly: Ctrl-C (SIGINT) and `kill -9` of a real `tsae-cache build` process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from pipeline.cache_runner import build_cache
from pipeline.store import ActivationStore
from pipeline.verify import verify_store

# The child is the real CLI with each forward pass slowed down and counted (in a file), so the test
# can send a signal after a known number of forwards, while the build is certainly still running.
SLOW_CLI = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if a parent ignored it
from pipeline import models
forward = models.LoadedModel.run_to_hooks
calls = 0
def slow(self, tokens, hooks):
    global calls
    calls += 1
    with open(os.environ["FORWARDS_FILE"], "w") as f:
        f.write(str(calls))
    time.sleep(0.1)
    return forward(self, tokens, hooks)
models.LoadedModel.run_to_hooks = slow
from pipeline.cli_cache import main
main(sys.argv[1:])
"""
ARGS = [
    "build",
    "--model",
    "tiny",
    "--ctx",
    "32",
    "--max-tokens",
    str(32 * 96),
    "--chunk-seqs",
    "8",
    "--batch-size",
    "4",
    "--no-progress",
]


def completed(manifest) -> int:
    try:
        return json.loads(manifest.read_text())["completed_chunks"]
    except (OSError, ValueError):
        return -1


def forwards(path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def run_until(script, cache_dir, key_dir, at_least: int, sig: int) -> subprocess.CompletedProcess:
    """Start the slow build, send `sig` once it has run the forwards of `at_least` more chunks than
    the manifest held at start (2 forwards per chunk of 8 sequences at batch 4), wait for exit."""
    counter = script.parent / "forwards.txt"
    counter.unlink(missing_ok=True)
    need = 2 * at_least + 1  # the next chunk's forwards have started: the build is mid-chunk
    proc = subprocess.Popen(
        [sys.executable, str(script), *ARGS, "--cache-dir", str(cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FORWARDS_FILE": str(counter)},
    )
    deadline = time.time() + 90
    while forwards(counter) < need:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the build never reached the chunk to interrupt"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_then_kill_9_then_resume_equals_uninterrupted(
    tiny_model, tmp_cache_dir, tmp_path, cfg_for, store_arrays
):
    cfg = cfg_for(tmp_path / "reference", max_tokens=32 * 96)  # the same build as ARGS
    reference = ActivationStore.open(build_cache(cfg, model=tiny_model).location)
    key_dir = tmp_cache_dir / reference.key
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)

    # Ctrl-C: exits 130 with one line, the store stays resumable and is refused by readers
    p = run_until(script, tmp_cache_dir, key_dir, 2, signal.SIGINT)  # mid-way through the 3rd chunk
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: interrupted: ") and "rerun the same command to resume" in line
    kept = json.loads((key_dir / "manifest.json").read_text())
    assert 2 <= kept["completed_chunks"] < 12 and f"{kept['n_seq']} sequences" in line
    assert json.loads((key_dir / "zarr.json").read_text())["attributes"]["status"] == "building"

    # kill -9 of the resumed build, further along: no cleanup at all
    p = run_until(script, tmp_cache_dir, key_dir, 3, signal.SIGKILL)  # 3 more chunks, then kill
    assert p.returncode == -signal.SIGKILL
    killed = json.loads((key_dir / "manifest.json").read_text())
    # the manifest on disk may lag the writer (its updates are throttled): what it names is what resumes
    assert killed["completed_chunks"] >= kept["completed_chunks"] and killed["n_seq"] < 96
    assert not ActivationStore.open(key_dir, require_complete=False).complete

    # resume to the end: exactly the uninterrupted store, nothing lost or duplicated
    done = build_cache(dataclasses.replace(cfg, cache_dir=str(tmp_cache_dir)), model=tiny_model)
    assert done.key == reference.key and done.resumed_seqs == killed["n_seq"]
    assert done.computed_tokens == (96 - killed["n_seq"]) * 32
    store = ActivationStore.open(done.key)
    assert store.n_seq == reference.n_seq == 96
    got = store_arrays(store)
    for name, want in store_arrays(reference).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert store.manifest().checksums == reference.manifest().checksums
    assert store.attrs["stats"] == reference.attrs["stats"]
    assert len(store.attrs["resumed_at"]) == 2 and verify_store(done.key).ok
    assert not (
        set(os.listdir(key_dir))
        - {"zarr.json", "manifest.json", ".build.lock", "acts", "tokens", "doc_id", "doc_offset"}
    )
