"""Cache builds survive kill -9, Ctrl-C and a full disk at random (seeded) points, and their locks die
with them.  The soak version with many more trials is `bench/soak_cache.py`."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from cache_faults import Rig
from click.testing import CliRunner
from forked_cli import cli_args
from store_compare import differences

from pipeline.cache_runner import build_cache
from pipeline.cli_cache import main
from pipeline.errors import StoreError
from pipeline.repair import repair_store
from pipeline.store import remove


@pytest.fixture(scope="module")
def rig(tiny_model, tmp_path_factory):
    rig = Rig(tiny_model, tmp_path_factory.mktemp("faults"))
    yield rig
    rig.close()


def assert_clean(trials) -> None:
    for t in trials:
        assert t.failures == [] and t.lost == 0, (t.kind, t.failures, t.events)


def test_kill9_at_random_points_then_resume_equals_reference(rig):
    rng = np.random.default_rng(6)
    trials = [rig.kill9(rng, kills=1), rig.kill9(rng, kills=2), rig.kill9(rng, kills=3)]
    assert_clean(trials)
    # a kill may land after its build finished (timing, or a write index past a resumed build's last)
    assert sum(sum(t.faults.values()) for t in trials) >= 3, [t.events for t in trials]


def test_ctrl_c_and_disk_full_at_random_points_then_resume(rig):
    rng = np.random.default_rng(7)
    trials = [rig.sigint(rng), rig.enospc(rng), rig.enospc(rng)]
    assert_clean(trials)
    assert sum(t.faults["enospc"] for t in trials) >= 1, [t.events for t in trials]


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(rig):
    home = rig.fresh()
    location = home / rig.key
    cfg = rig.config(home)
    rig.slow_s, slow = 0.5, rig.slow_s  # a build that takes ~12 s: it holds the lock while we look
    try:
        child = rig.start(cli_args(cfg))
    finally:
        rig.slow_s = slow
    deadline = time.time() + 60
    while not (location / "manifest.json").exists():
        assert child.proc.is_alive() and time.time() < deadline, child.text()
        time.sleep(0.05)
    with pytest.raises(StoreError, match="another process is building"):
        build_cache(cfg, model=rig.model)
    with pytest.raises(StoreError, match="another process is building"):
        remove(rig.key, home)
    with pytest.raises(StoreError, match="another process is building"):
        repair_store(location, model=rig.model)
    res = CliRunner().invoke(main, ["ls", "--cache-dir", str(home)])
    assert rig.key in res.stdout and "building" in res.stdout

    assert child.stop(signal.SIGKILL, 0) == -signal.SIGKILL
    r = build_cache(cfg, model=rig.model)  # the OS released the dead holder's flock
    assert not r.hit and differences(rig.reference, location) == []
