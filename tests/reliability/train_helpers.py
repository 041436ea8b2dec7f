"""Shared by the training reliability tests: a tiny activation store, weight comparison, and
spawned data-parallel ranks (a gloo group on loopback) that run training jobs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def tiny_store(cache_dir: Path, tiny_model):
    """96 sequences of 32 tokens (tiny model, layer-1 residual) from 48 Shakespeare paragraphs; built
    once per cache_dir (the cache is content-addressed, a second call finds it)."""
    from pipeline.cache_runner import CacheConfig, build_cache
    from pipeline.sources import iter_documents
    from pipeline.store import ActivationStore

    cache_dir.mkdir(parents=True, exist_ok=True)
    src = cache_dir / "docs.jsonl"
    if not src.is_file():
        text = next(iter(iter_documents("shakespeare"))).text
        docs = [text[i : i + 900] for i in range(0, 900 * 48, 900)]
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = CacheConfig(model="tiny", dataset=str(src), split="all", ctx=32, max_tokens=32 * 96, chunk_seqs=8,
                      batch_size=8, progress=False, cache_dir=str(cache_dir))
    return ActivationStore.open(build_cache(cfg, model=tiny_model).key, str(cache_dir))


def cli_env() -> dict[str, str]:
    """Environment of a training subprocess: offline, one thread (as the in-process reference)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train_command(*args: str, ranks: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*(launcher if ranks > 1 else [sys.executable]), "-m", "pipeline.train_runner", *args]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "sae_weights.safetensors"))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over float tensors of ||a - b|| / ||a||; integer tensors (firing counts) must be equal."""
    assert a.keys() == b.keys()
    worst = 0.0
    for name, x in a.items():
        if not x.is_floating_point():
            assert torch.equal(x, b[name]), name
        elif x.norm() > 0:
            worst = max(worst, float((x - b[name]).norm() / x.norm()))
    return worst


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- spawned ranks ------------------------------------------------------------------------------
class Stop(Exception):
    pass


def stop_at(step: int):
    def cb(loop, x, out, terms):
        if loop.state["step"] == step:
            raise Stop

    return cb


def train(job: dict):
    """job: kind ("static" | "tsae"), cfg (trainer config), data (array), out (folder), and optional
    resume (bool) and stop_at (step at which a callback raises Stop)."""
    from tsae.train.static_trainer import train_static
    from tsae.train.tsae_trainer import train_tsae

    fn = train_static if job["kind"] == "static" else train_tsae
    callbacks = (stop_at(job["stop_at"]),) if "stop_at" in job else ()
    return fn(job["cfg"], job["data"], out_dir=job["out"], resume=job["out"] if job.get("resume") else None,
              callbacks=callbacks)


def _rank(rank: int, world: int, port: int, jobs: list[dict]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for job in jobs:
            try:
                sae = train(job).sae
            except Stop:
                continue
            state = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
            save_file(state, str(Path(job["out"]) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def run_ranks(jobs: list[dict], world: int = 2) -> None:
    """Run `jobs` in order on `world` spawned ranks; rank r leaves <out>/rank{r}.safetensors."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, jobs), nprocs=world, join=True)


# ---- crashing a run -----------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc); torchrun starts its workers in their own sessions,
    so they are not in its process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_when_checkpointed(proc: subprocess.Popen, run_dir: Path, timeout: float = 180.0) -> int:
    """Poll until run_dir holds a complete checkpoint, then SIGKILL the process and all its
    descendants at once; -> the step of the checkpoint seen.  Fails if the run ended first."""
    from tsae.train.checkpoint import latest_checkpoint, read_state

    deadline = time.monotonic() + timeout
    while (found := latest_checkpoint(run_dir / "checkpoints")) is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return read_state(found)["step"]
