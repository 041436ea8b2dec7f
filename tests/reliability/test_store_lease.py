"""Build leases on S3 (`pipeline.store_lease`), against a real S3-compatible server on loopback (moto):
two CLI builds of one key (one builds, one is refused), a holder killed with -9 taken over after its
ttl, racing takers of a stale lease (exactly one wins), a lost lease fencing its holder, and `repair` /
`rm` refused while a lease lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec.core
import numpy as np
import pytest
from click.testing import CliRunner
from test_cache_concurrency import GATED_CLI, args_for
from test_distributed_cache import s3  # noqa: F401  (the moto server fixture)

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.cli_cache import main
from pipeline.errors import StoreError
from pipeline.repair import repair_store
from pipeline.store import ActivationStore, remove
from pipeline.store_lease import Lease, lease_is_live
from pipeline.store_lock import is_held, lock_builder, unlock
from pipeline.verify import verify_store

TTL = 2.0  # seconds; a lease is stale ttl + 1 s (header resolution) after its last renewal
SMALL = dict(model="tiny", ctx=32, max_tokens=32 * 32, chunk_seqs=8, batch_size=4, progress=False)
ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys, time\nfrom pipeline.store_lock import lock_builder\nlock_builder(sys.argv[1])\n"
HOLD += "print('held', flush=True)\ntime.sleep(120)\n"


@pytest.fixture
def home(s3, monkeypatch, request) -> str:  # noqa: F811
    """A cache home of this test's own in the moto bucket (moto keeps one state per process); short ttl."""
    monkeypatch.setenv("TSAE_LEASE_TTL", str(TTL))
    return f"s3://tsae/{request.node.name}"


def files(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs.find(path)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return build_cache(CacheConfig(**SMALL, cache_dir=str(tmp_path_factory.mktemp("ref"))), model=tiny_model)


def assert_equal_to(location: str, reference) -> None:
    got, want = ActivationStore.open(location), ActivationStore.open(reference.location)
    assert got.n_seq == want.n_seq and got.manifest().checksums == want.manifest().checksums
    for name in ("acts/blocks.1.hook_resid_post", "tokens", "doc_id", "doc_offset"):
        np.testing.assert_array_equal(got.group[name][:], want.group[name][:], err_msg=name)
    assert got.attrs["stats"] == want.attrs["stats"]
    assert verify_store(location).ok


def wait_until_stale(url: str, limit: float = TTL + 4) -> float:
    t0 = time.monotonic()
    while is_held(url):
        assert time.monotonic() - t0 < limit, "the lease never went stale"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_two_cli_builds_on_s3_one_builds_one_is_refused(home, reference, tiny_model, tmp_cache_dir, tmp_path):
    gate, script = tmp_path / "gate", tmp_path / "gated_cli.py"
    script.write_text(GATED_CLI)
    env = {**os.environ, "GATE": str(gate), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), *args_for(CacheConfig(**SMALL)), "--cache-dir", home, "--json"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "ab"
    ]
    deadline = time.time() + 300
    while all(p.poll() is None for p in procs):  # the one refused by the lease exits first
        assert time.time() < deadline, "neither build finished"
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    out, err = loser.communicate()
    location = f"{home}/{reference.key}"
    assert loser.returncode == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: another process is building {location}; wait for it or stop it"), err
    assert f"pid {winner.pid} " in err  # the line names the holder

    time.sleep(TTL + 1.5)  # the winner, waiting at the gate, keeps renewing its lease
    assert winner.poll() is None and is_held(f"{location}/.build.lock")
    with pytest.raises(StoreError, match="another process is building"):
        build_cache(CacheConfig(**SMALL, cache_dir=home), model=tiny_model)

    gate.touch()
    out, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err[-3000:]
    assert_equal_to(location, reference)
    assert files(f"{location}/.build.lock") == []  # released on a clean exit


def test_a_holder_killed_with_sigkill_is_taken_over_after_its_ttl(home, reference, tiny_model):
    location = f"{home}/{reference.key}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, location], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        cfg = CacheConfig(**SMALL, cache_dir=home)
        with pytest.raises(StoreError, match=f"another process is building .* pid {child.pid} "):
            build_cache(cfg, model=tiny_model)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    waited = wait_until_stale(f"{location}/.build.lock")
    assert waited <= TTL + 3
    built = build_cache(cfg, model=tiny_model)  # takes the dead holder's lease over
    assert not built.hit and built.computed_tokens == reference.n_tokens
    assert_equal_to(location, reference)


def take(lease: Lease, barrier: threading.Barrier, won: list, refused: list) -> None:
    barrier.wait()
    try:
        won.append(lease.acquire())
    except StoreError as e:
        refused.append(str(e))


def test_racing_takers_of_a_stale_lease_exactly_one_wins(home):
    url = f"{home}/.build.lock"
    hung = Lease(url, "busy").acquire()
    hung._stop.set()  # its holder hangs: no renewal, no release
    hung._thread.join()
    wait_until_stale(url)
    barrier, won, refused = threading.Barrier(6), [], []
    takers = [Lease(url, "busy") for _ in range(6)]  # made here: fsspec keeps one client per thread
    threads = [threading.Thread(target=take, args=(t, barrier, won, refused)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5, refused
    assert all(m.startswith("busy (lease held by pid ") for m in refused), refused
    with pytest.raises(StoreError, match=r"lost the build lease .*not renewed for"):
        hung.check()  # a holder that could not renew for a ttl stops writing
    unlock(won[0])

    # the primitive: two takers holding the same ETag, one after the other (staleness is their call)
    holder = Lease(url, "").acquire()
    etag = holder.etag
    first, second = Lease(url, ""), Lease(url, "")
    first._put(IfMatch=etag)
    with pytest.raises(OSError):
        second._put(IfMatch=etag)
    assert Lease(url, "").read()[0]["token"] == first.token
    holder.release()  # taken over: leaves the winner's lease alone
    assert Lease(url, "").read()[0]["token"] == first.token


def test_a_holder_taken_over_learns_it_at_its_next_renewal(home):
    url = f"{home}/.build.lock"
    holder = Lease(url, "busy").acquire()
    holder.check()
    Lease(url, "")._put(IfMatch=holder.etag)  # a taker that misjudged it stale
    time.sleep(TTL / 3 + 0.5)
    with pytest.raises(StoreError, match="another process took it over"):
        holder.check()
    holder.release()
    assert lease_is_live(url)  # the taker's lease is left alone


def test_repair_and_rm_refuse_while_a_lease_lives(home, reference, tiny_model):
    built = build_cache(CacheConfig(**SMALL, cache_dir=home), model=tiny_model)
    lease = lock_builder(built.location)
    try:
        with pytest.raises(StoreError, match=f"another process is building {built.location}"):
            repair_store(built.location)
        with pytest.raises(StoreError, match="another process is building"):
            remove(built.key, home)
        res = CliRunner().invoke(main, ["rm", built.key, "--cache-dir", home])
        assert res.exit_code == 2 and res.stderr.startswith("error: another process is building"), res.output
        assert len(res.stderr.strip().splitlines()) == 1
        assert_equal_to(built.location, reference)  # untouched
    finally:
        unlock(lease)
    report = repair_store(built.location)  # nothing damaged: nothing rewritten
    assert report.chunks == {} and not lease_is_live(f"{built.location}/.build.lock")
    assert remove(built.key, home) == built.location
    assert files(built.location) == []
