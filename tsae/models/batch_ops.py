"""Batch-level operations that see the *global* batch under data parallelism.

Data-parallel training (tsae/train/distributed.py) cuts one global batch of B rows (windows) into W
contiguous shares, rank r holding rows [o_r, o_r + b_r) with n_r tokens, N = sum_r n_r, and replaces
every rank's gradient by sum_r n_r g_r / N.  That is the 1-process gradient for any loss that is a
mean over tokens.  A batch-coupled objective (BatchTopK's threshold, a minimum over the batch,
InfoNCE negatives) is not such a mean; the helpers here make it the 1-process one:

    rows(b_r)                  -> (o_r, [b_0, ..., b_{W-1}])   who holds which rows
    kth_largest(v_r, K)        the K-th largest of the union of all ranks' values (exact: only each
                               rank's local top K can be in the global top K, so only those travel)
    global_min(v)              the minimum over ranks
    gather_rows(x_r)           the ranks' rows concatenated in rank order (sizes may differ)
    gather_with_grad(x_r, o_r, N / n_r)
                               the same, differentiable: a term computed on the result (the same
                               value on every rank) sends its gradient to this rank's rows only,
                               scaled by N / n_r, so that after the token-weighted all-reduce the
                               gradient is the 1-process one: sum_r (n_r / N)(N / n_r) dL/dx_r = dL/dx

They communicate only inside `global_batch()`, which the training loop enters on every rank while
the ranks step in lockstep (tsae/train/distributed.py, `DistInfo.global_trackers`); there every rank
must make the same calls in the same order.  Anywhere else (one process, evaluation, a model run on
one rank) every function is the 1-process identity on the local batch, with no communication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

_synced = False  # inside global_batch() with a process group of > 1 rank


@contextlib.contextmanager
def global_batch() -> Iterator[None]:
    """Within: batch-level operations act on the global batch of the default process group."""
    global _synced
    before = _synced
    _synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    try:
        yield
    finally:
        _synced = before


def world_size() -> int:
    """Ranks sharing the batch (1 outside global_batch())."""
    return dist.get_world_size() if _synced else 1


def rank() -> int:
    return dist.get_rank() if _synced else 0


def _all_sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, t)
    return [int(s) for s in sizes]


def rows(n_local: int, device: torch.device | None = None) -> tuple[int, list[int]]:
    """(offset of this rank's rows in the global batch, every rank's row count in rank order)."""
    if world_size() == 1:
        return 0, [n_local]
    sizes = _all_sizes(n_local, device or torch.device("cpu"))
    return sum(sizes[: rank()]), sizes


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of x [n_r, ...] concatenated in rank order, no gradient (a collective of the
    initialised default group, whether or not inside global_batch())."""
    sizes = _all_sizes(x.shape[0], x.device)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def gather_rows(x: Tensor) -> Tensor:
    """all_gather_rows inside global_batch(), x itself outside."""
    return x if world_size() == 1 else all_gather_rows(x)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gather_with_grad(x: Tensor, offset: int, grad_scale: float) -> Tensor:
    """gather_rows(x), differentiable through this rank's own rows (at `offset` of the result) with
    gradient times grad_scale = N / n_r (module docstring); the other ranks' rows are constants here
    (their own ranks differentiate them)."""
    if world_size() == 1:
        return x
    gathered = gather_rows(x.detach())
    own = _ScaleGrad.apply(x, grad_scale)
    return torch.cat([gathered[:offset], own, gathered[offset + x.shape[0] :]])


def global_min(t: Tensor) -> Tensor:
    """Elementwise minimum over ranks (a new tensor)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of all ranks' values together (k clamped to their number).  Each rank sends
    only its own k largest: no other value can be among the k largest of the union."""
    flat = values.reshape(-1)
    top = flat.topk(min(int(k), flat.numel()), sorted=False).values
    if world_size() == 1:
        return top.min()
    union = gather_rows(top)
    return union.topk(min(int(k), union.numel()), sorted=False).values.min()
