"""T-SAE beyond test_baselines.py: its batch-coupled terms on 3 gloo ranks with uneven shares (7 windows:
2 + 2 + 3) equal those of one process on the whole batch (BatchTopK codes, the running threshold, the
InfoNCE value, and the gradient after the loop's token-weighted all-reduce sum_r n_r g_r / N); and the
trainer's k schedule (coeffs["k"]) sets the BatchTopK's k."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tsae.models import batch_ops
from tsae.models.t_sae import ContrastiveTemporalSAE, ContrastiveTSAEConfig

B, T, D_IN, D_SAE = 7, 6, 8, 32


def step(model: ContrastiveTemporalSAE, x: torch.Tensor):
    """One training step's codes, terms and (unreduced) gradients, from RNG seed 0."""
    torch.manual_seed(0)
    model.zero_grad()
    out = model(x)
    terms = model.loss_terms(x, out, {})
    terms["loss"].backward()
    return out.codes.detach(), terms, {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = ContrastiveTSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, threshold_start_steps=0, contrastive=1.0,
                                    contrastive_pairs=20, high_fraction=0.25, seed=3)
        x = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(1))
        one = ContrastiveTemporalSAE(cfg).train()
        codes1, terms1, grads1 = step(one, x)  # outside global_batch(): the local (here: whole) batch

        lo, hi = rank * B // world, (rank + 1) * B // world
        model = ContrastiveTemporalSAE(cfg).train()
        with batch_ops.global_batch():
            assert batch_ops.rows(hi - lo) == (lo, [2, 2, 3])
            codes, terms, grads = step(model, x[lo:hi])
        n, N = (hi - lo) * T, B * T
        assert torch.equal(codes, codes1[lo:hi])  # BatchTopK over the global batch
        assert int((codes1 > 0).sum()) == cfg.k * N
        assert torch.equal(model.threshold, one.threshold) and one.threshold > 0
        assert torch.allclose(terms["contrastive"], terms1["contrastive"], rtol=1e-6)
        loss = terms["loss"].detach() * n / N
        dist.all_reduce(loss)
        assert torch.allclose(loss, terms1["loss"], rtol=1e-5)
        for name, g in grads.items():
            g = g * n / N
            dist.all_reduce(g)
            assert torch.allclose(g, grads1[name], rtol=1e-5, atol=1e-6), name
    finally:
        dist.destroy_process_group()


def test_three_uneven_ranks_compute_the_one_process_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(3, port), nprocs=3, join=True)


def test_batch_ops_are_the_identity_outside_global_batch():
    v = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert batch_ops.kth_largest(v, 2) == 3.0 and batch_ops.kth_largest(v, 10) == 1.0
    assert batch_ops.rows(4) == (0, [4]) and batch_ops.world_size() == 1
    assert batch_ops.gather_rows(v) is v and batch_ops.global_min(v) is v


def test_k_schedule_sets_the_batch_topk_k():
    sae = ContrastiveTemporalSAE(ContrastiveTSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, seed=3)).train()
    x = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    assert int((out.codes > 0).sum()) == 3 * B * T
    fixed = sae.loss_terms(x, out, {})
    annealed = sae.loss_terms(x, out, {"k": 6})
    assert fixed["l0"] == 3 and annealed["l0"] == 6
    flat = out.aux["pre"].relu().flatten()  # the 6 B T largest of the batch, by hand
    idx = flat.topk(6 * B * T).indices
    codes = torch.zeros_like(flat).scatter(0, idx, flat[idx]).view_as(out.codes)
    mse = (x - sae.decode(codes)).pow(2).sum(-1).mean()
    assert torch.allclose(annealed["mse"], mse, rtol=1e-6)
