"""Distributed caching: 2 torchrun workers fill one store equal to a single-process build; a worker
killed with -9 is rerun alone and the store finished with nothing lost or duplicated; stores on a real
S3-compatible server (moto, loopback) built by one process and by the share-writing protocol."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.cli_cache import main
from pipeline.distributed_cache import RECORDS, build_distributed
from pipeline.errors import StoreError
from pipeline.store import ActivationStore, list_stores
from pipeline.verify import verify_store

SETTINGS = dict(model="tiny", ctx=32, max_tokens=32 * 96, chunk_seqs=8, batch_size=4, progress=False)
N_CHUNKS = 12
ARGS = ["build", "--model", "tiny", "--ctx", "32", "--max-tokens", str(32 * 96), "--chunk-seqs", "8"]
ARGS += ["--batch-size", "4", "--no-progress"]
ARRAYS = ["acts/blocks.1.hook_resid_post", "tokens", "doc_id", "doc_offset"]
# A worker whose forward passes are slowed down, so a kill lands mid-build.
SLOW_CLI = """
import sys, time
from pipeline import models
forward = models.LoadedModel.run_to_hooks
def slow(self, tokens, hooks):
    time.sleep(0.1)
    return forward(self, tokens, hooks)
models.LoadedModel.run_to_hooks = slow
from pipeline.cli_cache import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The single-process build (one thread, as each worker runs) every distributed store must equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = CacheConfig(**SETTINGS, cache_dir=str(tmp_path_factory.mktemp("reference")))
        return ActivationStore.open(build_cache(cfg, model=tiny_model).location)
    finally:
        torch.set_num_threads(threads)


def assert_same_store(store: ActivationStore, reference: ActivationStore) -> None:
    assert store.n_seq == reference.n_seq == N_CHUNKS * 8
    for name in ARRAYS:
        a, b = store.group[name], reference.group[name]
        assert a.dtype == b.dtype and a.chunks == b.chunks, name
        np.testing.assert_array_equal(a[:], b[:], err_msg=name)
    assert store.manifest().checksums == reference.manifest().checksums
    assert store.attrs["stats"] == reference.attrs["stats"]  # float64 sums in the same order: bit-equal
    assert store.attrs["sequences"] == reference.attrs["sequences"]
    assert verify_store(store.location).ok


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_two_workers_fill_one_store_equal_to_a_single_process(reference, tmp_cache_dir):
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.cli_cache", *ARGS, "--workers", "2", "--json"],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["key"] == reference.key  # one report per job: rank 0's
    store = ActivationStore.open(reference.key)
    assert_same_store(store, reference)
    assert store.attrs["distributed"]["world_size"] == 2
    assert not (tmp_cache_dir / reference.key / RECORDS).exists()  # records folded, then removed

    # a repeat is a hit found before any worker starts; bad combinations are one-line errors
    res = CliRunner().invoke(main, [*ARGS, "--workers", "2"])
    assert res.exit_code == 0 and res.stdout.startswith("cache hit: "), res.output
    for bad, msg in [(["--shard", "2/2"], "--shard needs 0 <= R < W"), (["--shard", "1-2"], "like R/W")]:
        res = CliRunner().invoke(main, [*ARGS, *bad])
        assert res.exit_code == 2 and res.stderr.startswith("error: ") and msg in res.stderr, res.output
        assert len(res.stderr.splitlines()) == 1
    res = CliRunner().invoke(main, [*ARGS, "--workers", "2", "--shard", "0/2"])
    assert res.exit_code == 2 and "choose one" in res.stderr


def records(key_dir) -> list[dict]:
    out = []
    for f in sorted((key_dir / RECORDS).glob("*.json")) if (key_dir / RECORDS).is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    return out


def test_worker_killed_then_rerun_alone_then_finished(reference, tiny_model, tmp_cache_dir, tmp_path):
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    key_dir = tmp_cache_dir / reference.key
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
        + ARGS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    deadline = time.time() + 900
    while len(mine := [r for r in records(key_dir) if r["rank"] == 1]) < 2:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.time() < deadline, "worker 1 never recorded two chunks"
        time.sleep(0.01)
    os.kill(mine[0]["pid"], signal.SIGKILL)
    _, err = job.communicate(timeout=600)
    assert job.returncode != 0, err[-3000:]  # torchrun stops the job when a worker dies

    at_death = {r["chunk"] for r in records(key_dir)}
    odd = {c for c in at_death if c % 2}
    assert len(odd) < N_CHUNKS // 2, "worker 1 finished before the kill"
    assert json.loads((key_dir / "zarr.json").read_text())["attributes"]["status"] == "building"
    with pytest.raises(StoreError, match="is incomplete"):
        ActivationStore.open(reference.key)

    cfg = CacheConfig(**SETTINGS, cache_dir=str(tmp_cache_dir))
    share = build_distributed(cfg, model=tiny_model, shard=(1, 2))  # the dead worker, rerun alone
    assert not share.complete and all(c % 2 == 0 for c in share.missing_chunks)
    assert share.computed_tokens == (N_CHUNKS // 2 - len(odd)) * 8 * 32
    done = build_cache(cfg, model=tiny_model)  # a plain build finishes it as a job of one worker
    assert done.complete and not done.hit
    # every chunk computed exactly once after the death: nothing recorded was redone
    assert share.computed_tokens + done.computed_tokens == (N_CHUNKS - len(at_death)) * 8 * 32
    assert_same_store(ActivationStore.open(reference.key), reference)
    assert not (key_dir / RECORDS).exists()


# ------------------------------------------------------------------------------------ object store
@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free loopback port with bucket ``tsae``; fsspec/s3fs reach it through the
    standard AWS_* variables, as they would reach MinIO, R2 or S3 itself."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3").create_bucket(Bucket="tsae")
    yield s3fs.S3FileSystem()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_stores_on_s3_single_process_and_by_shares(reference, tiny_model, s3):
    # one process, the ordinary writer
    cfg = CacheConfig(**SETTINGS, cache_dir="s3://tsae/cache")
    built = build_cache(cfg, model=tiny_model)
    assert built.location == f"s3://tsae/cache/{reference.key}"
    store = ActivationStore.open(reference.key, cache_dir="s3://tsae/cache", model="tiny")
    assert_same_store(store, reference)
    assert [s["key"] for s in list_stores("s3://tsae/cache")] == [reference.key]
    assert build_cache(cfg).hit  # a repeat answers from the bucket without loading the model

    # the distributed protocol: shares write chunks + records, rank 0 alone writes metadata
    cfg = CacheConfig(**SETTINGS, cache_dir="s3://tsae/dist")
    with pytest.raises(StoreError, match="does not exist yet"):
        build_distributed(cfg, model=tiny_model, shard=(1, 2))
    first = build_distributed(cfg, model=tiny_model, shard=(0, 2))
    assert not first.complete and first.missing_chunks == list(range(1, N_CHUNKS, 2))
    assert len(s3.ls(f"tsae/dist/{reference.key}/{RECORDS}")) == N_CHUNKS // 2
    assert not build_distributed(cfg, model=tiny_model, shard=(1, 2)).complete
    done = build_cache(cfg, model=tiny_model)
    assert done.complete and done.computed_tokens == 0  # rank 0 only folded the records and finished
    assert_same_store(ActivationStore.open(done.location), reference)
    s3.invalidate_cache()
    assert not s3.exists(f"tsae/dist/{reference.key}/{RECORDS}")


# ------------------------------------------------------------------------------------ preallocation
def test_rank0_preallocates_no_more_than_the_corpus_gives(tiny_model, tmp_cache_dir):
    """A --max-tokens far beyond a small corpus: rank 0 preallocates the chunks the corpus fills (the
    workers cannot grow the arrays, and finish() enumerates every chunk it trims), and a corpus
    smaller than one chunk gets a chunk of its own size, as in a single-process build."""
    import zarr

    src = tmp_cache_dir.parent / "docs.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    cfg = CacheConfig(**{**SETTINGS, "max_tokens": 10**12}, dataset=str(src), split="all")
    share = build_distributed(cfg, model=tiny_model, shard=(0, 2))  # rank 0's share: not finished
    preallocated = zarr.open_group(share.location, mode="r")["tokens"].shape[0]
    done = build_cache(cfg, model=tiny_model)
    assert done.complete and done.n_seq > 8  # several chunks: the second share had work to do
    assert preallocated == -(-done.n_seq // 8) * 8, (preallocated, done.n_seq)

    src.write_text("The quick brown fox jumps over the lazy dog. " * 15)  # fewer than 8 sequences
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp_cache_dir.parent / "small"))
    whole = build_distributed(cfg, model=tiny_model, shard=(0, 1))
    single = build_cache(
        dataclasses.replace(cfg, cache_dir=str(tmp_cache_dir.parent / "single")), model=tiny_model
    )
    assert whole.complete and 0 < whole.n_seq < 8
    for name in ("tokens", ARRAYS[0]):
        a, b = (zarr.open_group(r.location, mode="r")[name] for r in (whole, single))
        assert a.chunks == b.chunks == (whole.n_seq, *a.shape[1:]) and np.array_equal(a[:], b[:]), name


@pytest.mark.parametrize("record", [b"not json", b'{"chunk": 0}',
                                    b'{"chunk": 0, "n_seq": 4, "checksums": [], "sums": {}}'])
def test_a_damaged_chunk_record_is_one_store_error(tmp_path, record):
    """fold() meets a damaged or foreign done/ record: a StoreError naming it, the manifest untouched."""
    from pipeline.distributed_share import fold, record_key
    from pipeline.errors import StoreError
    from pipeline.store_layout import Manifest, write_key, zarr_store

    store = zarr_store(tmp_path / "s", read_only=False)
    write_key(store, record_key(0), record)
    manifest = Manifest(chunk_seqs=8, batch_size=4)
    with pytest.raises(StoreError, match="remove it and rerun"):
        fold(manifest, store)
    assert manifest.completed_chunks == 0 and manifest.checksums == {}
