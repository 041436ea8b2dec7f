"""Data-parallel training: what every rank exchanges so that W ranks train the model one process would.

Under `torchrun` (or any initialised default process group) with world size W, every rank holds a
full copy of the model and optimiser.  One global batch of B windows (the 1-process batch, same
deterministic order) is cut into W contiguous shares, rank r taking rows [r B // W, (r+1) B // W)
(`WindowBatches(rank=, world_size=)`).  Per step, with n_r tokens on rank r, N = sum_r n_r:

    grads      g  = sum_r n_r g_r / N          one all-reduce of [n_r g_r (flat), has_grad, n_r l_r, n_r]
    loss       l  = sum_r n_r l_r / N          (same all-reduce; the guard's verdict uses it, so every
                                                rank skips the same steps)
    trackers   firing / lifecycle counts are summed over ranks inside the model's update, and
               "fired in this batch" is taken over the global batch (`global_trackers`), so dead
               masks (aux-k, revival) equal those of the global batch
    logs       interval sums of n_r / N-weighted loss terms, all-reduced at log time

Every loss term of every model is a mean over tokens (or over (token, latent) pairs), so
sum_r n_r grad(mean_r) / N is the gradient of the global mean: 2 ranks reproduce 1 process up to
floating-point summation order.  Batch-coupled objectives (the T-SAE's BatchTopK threshold, its
running-threshold minimum, its InfoNCE pairs and negatives) use tsae/models/batch_ops.py, which
inside the loop (`global_trackers`) computes them over the global batch and routes the gradient of
a global term to each rank's own rows, scaled by N / n_r to undo the token weighting above.

Broadcast from rank 0: the initial weights (after b_dec init) and the input scale; after a revival,
the revived model.  Rank 0 alone writes checkpoints, logs and the final SAE.  After the gradient
all-reduce every rank holds bitwise the same gradient, hence the same weights, without further sync.

`current()` describes the process group (rank 0 of 1 when there is none: every function here is
then a no-op and the single-process loop runs unchanged).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tsae.models import batch_ops
from tsae.models.activity import FiringTracker
from tsae.models.lifecycle import LifecycleTracker


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops on one process) ---------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place."""
        if self.active:
            dist.all_reduce(t)
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        """Rank 0's value of t (bool tensors through uint8)."""
        if self.active:
            if t.dtype == torch.bool:
                return self.broadcast_(t.to(torch.uint8)).bool()
            dist.broadcast(t, src=0)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Every parameter and buffer of `module` from rank 0."""
        if self.active:
            for t in (*module.parameters(), *module.buffers()):
                dist.broadcast(t.data, src=0)

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows of x [n_r, ...] concatenated in rank order: the global batch."""
        return batch_ops.all_gather_rows(x) if self.active else x

    @torch.no_grad()
    def reduce_step(self, params: Sequence[nn.Parameter], loss: Tensor, n_local: int) -> tuple[Tensor, int]:
        """Replace every rank's gradients by the token-weighted global gradient; -> (global loss, N).

        A parameter gets a gradient when any rank produced one (a rank without one contributes 0);
        one that no rank touched keeps grad None, so Adam leaves it alone as on one process."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([*(g.reshape(-1) * n_local for g in grads),
                          torch.tensor([p.grad is not None for p in params], dtype=loss.dtype,
                                       device=loss.device),
                          (loss.detach() * n_local).reshape(1), loss.new_tensor([n_local])])
        dist.all_reduce(flat)
        *has, _, n_global = flat[-2 - len(params) :].tolist()  # one device sync
        at = 0
        for p, h in zip(params, has, strict=True):
            p.grad = (flat[at : at + p.numel()] / n_global).view_as(p) if h > 0 else None
            at += p.numel()
        return flat[-2] / n_global, round(n_global)

    # ---- the global batch inside the model: trackers and batch-level operations ----------------
    @contextlib.contextmanager
    def global_trackers(self, model: nn.Module) -> Iterator[None]:
        """While active, the model sees the global batch: every FiringTracker / LifecycleTracker of
        `model` records it (see `_global_update`) instead of this rank's share, and batch-level
        operations (BatchTopK, batch minima, InfoNCE pairs: tsae/models/batch_ops.py) act on it.
        Every rank must then run the model in lockstep (a rank-0-only forward in training mode
        would wait for the others)."""
        trackers = [m for m in model.modules() if isinstance(m, FiringTracker | LifecycleTracker)]
        if not self.active:
            yield
            return
        # the method that changes the buffers: FiringTracker.update goes through record
        methods = [(m, "record" if isinstance(m, FiringTracker) else "update") for m in trackers]
        for m, name in methods:
            setattr(m, name, functools.partial(_global_update, m, getattr(m, name)))
        try:
            with batch_ops.global_batch():
                yield
        finally:
            for m, name in methods:
                delattr(m, name)


# Buffers that are not per-batch sums: "fired within the batch" resets / sets them.
_RESET_ON_FIRE, _SET_ON_FIRE = "tokens_since_fired", "ever_fired"


@torch.no_grad()
def _global_update(tracker: nn.Module, local_update, *batch) -> None:
    """Run the tracker's own update on this rank's share, then replace the result by the update the
    global batch would have made.  Every count (tokens seen, fires, births, deaths, runs, histogram)
    is a sum over rows, so its increments add up over ranks (rows are whole windows); a latent fired
    in the global batch iff its summed fire count grew; then
        tokens_since_fired = 0 if fired else before + N,   ever_fired = before | fired."""
    before = {name: b.clone() for name, b in tracker.named_buffers()}
    local_update(*batch)
    summed = [n for n in before if n not in (_RESET_ON_FIRE, _SET_ON_FIRE)]
    delta = torch.cat([(getattr(tracker, n) - before[n]).reshape(-1) for n in summed])
    dist.all_reduce(delta)
    at = 0
    for name in summed:
        buf = getattr(tracker, name)
        buf.copy_(before[name] + delta[at : at + buf.numel()].view_as(buf))
        at += buf.numel()
    fired = tracker.fire_count > before["fire_count"]
    n_tokens = tracker.tokens_seen - before["tokens_seen"]
    tracker.tokens_since_fired.copy_(torch.where(fired, 0, before[_RESET_ON_FIRE] + n_tokens))
    if _SET_ON_FIRE in before:
        tracker.ever_fired.copy_(before[_SET_ON_FIRE] | fired)


def current() -> DistInfo:
    """The default process group's rank and size (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT): nccl with one GPU per local rank on CUDA, gloo on CPU.  One process: no-op."""
    if not launched_by_torchrun() or dist.is_initialized():
        return current()
    cuda = torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
