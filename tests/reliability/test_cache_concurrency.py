"""Concurrent builds of one key never produce two writers; readers of one key are untouched by a build
of another.  Real `tsae-cache build` subprocesses (tiny model) and forked races."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cache_faults import Rig
from click.testing import CliRunner
from store_compare import TINY, differences, snapshot

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.cli_cache import main
from pipeline.store import ActivationStore

ROOT = Path(__file__).resolve().parents[2]
# The real CLI, whose forward passes wait until a gate file exists: a build that has taken the lock
# stays mid-build until the test lets it go, so the outcome of the race does not depend on timing.
GATED_CLI = """
import os, sys, time
from pipeline import models
forward = models.LoadedModel.run_to_hooks
def gated(self, tokens, hooks):
    while not os.path.exists(os.environ["GATE"]):
        time.sleep(0.02)
    return forward(self, tokens, hooks)
models.LoadedModel.run_to_hooks = gated
from pipeline.cli_cache import main
main(sys.argv[1:])
"""


def args_for(cfg: CacheConfig) -> list[str]:
    return [
        *("build", "--model", "tiny", "--ctx", str(cfg.ctx), "--max-tokens", str(cfg.max_tokens)),
        *("--chunk-seqs", str(cfg.chunk_seqs), "--batch-size", str(cfg.batch_size), "--no-progress"),
    ]


def test_two_cli_builds_of_one_key_while_another_key_is_read(tiny_model, tmp_cache_dir, tmp_path):
    # another key, read throughout by this process
    other = build_cache(CacheConfig(**{**TINY, "max_tokens": 32 * 40}, layers=(0,)), model=tiny_model)
    want = snapshot(Path(other.location))["arrays"]["acts/blocks.0.hook_resid_post"]
    cfg = CacheConfig(**TINY, cache_dir=str(tmp_cache_dir))
    reference = build_cache(CacheConfig(**TINY, cache_dir=str(tmp_path / "ref")), model=tiny_model)

    gate = tmp_path / "gate"
    script = tmp_path / "gated_cli.py"
    script.write_text(GATED_CLI)
    env = {**os.environ, "GATE": str(gate), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), *args_for(cfg), "--json"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    deadline = time.time() + 300
    while all(p.poll() is None for p in procs):  # the one that did not get the lock exits first
        assert time.time() < deadline, "neither build finished"
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    out, err = loser.communicate()
    assert loser.returncode == 2 and out == "" and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: another process is building")
    assert winner.poll() is None
    assert "building" in CliRunner().invoke(main, ["ls"]).stdout

    gate.touch()  # the winner writes its chunks now, while this process reads the other store
    passes = 0
    while winner.poll() is None or passes == 0:
        store = ActivationStore.open(other.key, hook="blocks.0.hook_resid_post")
        got = np.concatenate(
            [
                store.read(np.arange(lo, min(lo + 8, store.n_seq)), store.hooks[0])[0]
                for lo in range(0, store.n_seq, 8)
            ]
        )
        np.testing.assert_array_equal(got, want.astype(np.float32))
        n = sum(len(b.seq) for b in store.iter_windows(store.hooks[0], window=8, batch_size=16, seed=passes))
        assert n == store.n_seq * 4
        passes += 1
    out, err = winner.communicate(timeout=120)
    assert winner.returncode == 0 and not json.loads(out.strip().splitlines()[-1])["hit"], err

    again = CliRunner().invoke(main, [*args_for(cfg)])  # a hit needs no model: in-process is cheap
    assert again.exit_code == 0 and again.stdout.startswith(f"cache hit: {reference.key}")
    assert differences(snapshot(Path(reference.location)), tmp_cache_dir / reference.key) == []
    assert set(os.listdir(tmp_cache_dir)) == {"models", other.key, reference.key}


@pytest.fixture(scope="module")
def rig(tiny_model, tmp_path_factory):
    rig = Rig(tiny_model, tmp_path_factory.mktemp("race"), calibrate=False)
    yield rig
    rig.close()


def test_forked_builds_racing_for_one_key(rig):
    """Start offsets across the whole build (before the store exists, mid-build, at the end): exactly
    one process builds; the other is a cache hit or refused; with the first killed, nothing is lost."""
    rng = np.random.default_rng(11)
    trials = [rig.race(rng), rig.race(rng), rig.race(rng, kill_one=True)]
    for t in trials:
        assert t.failures == [] and t.lost == 0, (t.failures, t.events)
