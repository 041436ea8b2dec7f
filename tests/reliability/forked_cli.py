"""Forked runs of the real `tsae-cache` CLI with a preloaded model and an injected fault.

Forking this process (~50 ms) instead of starting an interpreter (~10 s) lets the reliability tests
and `bench/soak_cache.py` run dozens of real builds.  The child runs `pipeline.cli_cache.main` with
``pipeline.models.load_model`` answering the parent's model, each forward optionally slowed (so a
signal can land mid-build), and optionally a fault at zarr's file writes: ENOSPC from the k-th on,
or SIGKILL / Ctrl-C at the k-th (before it, after it, or half-written).

Fork only while torch runs on ONE thread in the parent (`fork_cli` refuses otherwise).  torch's CPU
kernels use GNU OpenMP, which is not fork-safe: a child forked after its parent ran a multi-threaded
kernel hangs at its own first one.  With ``OMP_NUM_THREADS`` unset (a plain ``make test``) every
forked build hung, which is why these tests once failed "in a fresh clone" only.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.cache_runner import CacheConfig


def cli_args(cfg: CacheConfig) -> list[str]:
    return [
        "build",
        *("--model", cfg.model, "--ctx", str(cfg.ctx), "--max-tokens", str(cfg.max_tokens)),
        *("--chunk-seqs", str(cfg.chunk_seqs), "--batch-size", str(cfg.batch_size)),
        *("--no-progress", "--cache-dir", str(cfg.cache_dir)),
    ]


def _child(args: list[str], model, log: str, slow_s: float, fault: tuple | None, ready) -> None:
    """Runs in the forked process: the real CLI with the preloaded model and the injected fault.

    fault: None; ``("enospc", k)``: every file write from the k-th on fails with ENOSPC;
    ``("kill", k, where)``: SIGKILL itself at the k-th file write, ``before`` it, ``after`` it, or
    ``mid``-way (half the bytes in zarr's temporary file, not yet renamed into place);
    ``("sigint", k)``: Ctrl-C right after the k-th file write.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest may have replaced
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115  the objects, not the fds)
    from pipeline import models

    models.load_model = lambda *a, **k: model
    if slow_s:
        forward = models.LoadedModel.run_to_hooks

        def slow(self, tokens, hooks):
            time.sleep(slow_s)
            return forward(self, tokens, hooks)

        models.LoadedModel.run_to_hooks = slow
    if fault is not None:
        import zarr.storage._local as local

        real_put, count = local._put, [0]

        def put(path, value, exclusive=False):
            count[0] += 1
            if fault[0] == "enospc" and count[0] > fault[1]:
                raise OSError(errno.ENOSPC, "No space left on device")
            if fault[0] == "kill" and count[0] == fault[1] and fault[2] != "after":
                if fault[2] == "mid":
                    data = bytes(value.as_buffer_like())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.with_suffix(".0123abcd.partial").write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            n = real_put(path, value, exclusive=exclusive)
            if fault[0] in ("kill", "sigint") and count[0] == fault[1]:
                os.kill(os.getpid(), signal.SIGKILL if fault[0] == "kill" else signal.SIGINT)
            return n

        local._put = put
    from pipeline.cli_cache import main

    ready.set()  # the parent's clock starts here, not during fork's own bookkeeping
    main(args)


@dataclass
class Child:
    proc: multiprocessing.Process
    log: Path
    started: float

    def stop(self, sig: int | None, after_s: float) -> int:
        """Send ``sig`` ``after_s`` seconds after the start (unless it ended); wait; the exit code."""
        self.proc.join(timeout=max(0.0, self.started + after_s - time.perf_counter()))
        if sig is not None and self.proc.is_alive():
            os.kill(self.proc.pid, sig)
        self.proc.join(timeout=120)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            raise RuntimeError(f"child {self.proc.pid} hung; log: {self.text()[-500:]}")
        return self.proc.exitcode

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def fork_cli(args: list[str], model, log: Path, slow_s: float = 0.0, fault: tuple | None = None) -> Child:
    """Start the CLI with ``args`` in a forked child (see `_child` for ``fault``); its output goes to
    ``log``.  The returned `Child`'s clock starts once the child runs."""
    if torch.get_num_threads() != 1:  # fail now, not after the child's 120 s hang
        raise RuntimeError("forking while torch runs more than one thread hangs the child (module doc)")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_child, args=(args, model, str(log), slow_s, fault, ready))
    proc.start()
    if not ready.wait(timeout=60):
        proc.kill()
        raise RuntimeError("a forked child never started")
    return Child(proc, log, time.perf_counter())
