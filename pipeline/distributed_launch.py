"""Distributed caching, the job's plumbing: the collectives, ``--shard R/W`` and ``--workers N``.

`Comm` is the rank, the world size and the two collectives the protocol needs (gloo under
torchrun); standalone (one share alone, or a plain build) they are trivial.  `launch` reruns the
``tsae-cache build`` command under torchrun with N local workers.  The protocol itself is in
`pipeline.distributed_cache`.
"""

from __future__ import annotations

import os
import sys

from pipeline.cache_plan import NeedModel, plan
from pipeline.errors import UserError
from pipeline.store import read_attrs
from pipeline.store_layout import STATUS_COMPLETE

TIMEOUT_S = float(os.environ.get("TSAE_DIST_TIMEOUT_S", 7 * 24 * 3600))  # a fast rank waits for slow ones


class PeerFailed(UserError):
    """Another worker failed; rank 0 reports why, the others exit quietly with this."""

    exit_code = 1


class Comm:
    """Rank, world size and the two collectives the protocol needs (gloo under torchrun).

    Standalone (one process running share r of W, or a plain build), the collectives are trivial.
    """

    def __init__(self, rank: int, world_size: int, group: bool = False):
        if not 0 <= rank < world_size:
            raise UserError(f"--shard needs 0 <= R < W, got {rank}/{world_size}")
        self.rank, self.world_size, self.group = rank, world_size, group

    @classmethod
    def from_env(cls) -> Comm:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1)
        import torch.distributed as dist

        if not dist.is_initialized():
            import datetime

            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.group:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.group:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/2"`` -> (1, 2)."""
    if not text:
        return None
    try:
        r, w = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like R/W (e.g. 1/2), got {text!r}") from None
    Comm(r, w)  # validates
    return r, w


def already_built(cfg) -> bool:
    """True if the store of ``cfg`` is complete (then no worker need start); bad options raise the
    same one-line errors a build would, before anything is launched."""
    try:
        p = plan(cfg)
    except NeedModel:  # a hub model not in the local cache: the workers will see
        return False
    attrs = read_attrs(p.location)
    return attrs is not None and attrs.get("status") == STATUS_COMPLETE


def launch(workers: int, argv: list[str]) -> int:
    """``--workers N``: rerun this command under torchrun with N local workers; returns the exit code.

    The workers print their own errors; a worker that dies (e.g. killed) becomes one line here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args, skip = [], False
    for a in argv:  # drop --workers N / --workers=N
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            args.append(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={workers}", "-m", "pipeline.cli_cache", *args]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code is not None and code < 0:  # killed by a signal: not reported by the worker itself
            print(
                f"error: worker {rank} died (signal {-code}); recorded chunks are kept, rerun the "
                f"same command (or --shard {rank}/{workers}) to resume",
                file=sys.stderr,
            )
            return 1
        return code or 1
    return 0
