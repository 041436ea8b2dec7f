"""Trainer for every SAE trained from scratch in one phase: relu_l1, topk, t_sae, crosscoder.

Schedules (functions of tokens seen t, over N = n_tokens):

    lr(t)  linear warm-up 0 -> lr over lr_warmup_tokens, constant, linear decay to 0 over the last
           lr_decay_frac of N
    k(t)   k_start -> k geometrically over the first k_anneal_frac of N, then k   (k_start > k;
           0 disables annealing); rounded to an int and passed as coeffs["k"]
    l1(t)  0 -> l1 linearly over the first l1_warm_up_frac of N (L1 warm-up)
    auxk   constant weight of the auxiliary-k loss

Init: tied encoder/decoder (the model's own init) and b_dec at the geometric median of a data
sample (in the scaled input space).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tsae.models.base import SAE
from tsae.train.loop import Callback, TrainerLoopFields, TrainLoop, auto_device
from tsae.train.schedule import Ramp, Schedule, constant, lr_schedule
from tsae.train.setup import (
    Phase,
    build_sae,
    init_from_data,
    make_source,
    resolve_scale,
    run_phases,
    save_run,
)


@dataclass
class StaticTrainerConfig(TrainerLoopFields):
    architecture: str = "topk"  # relu_l1 | topk | t_sae | crosscoder
    d_sae: int = 0  # 0: expansion * d_in
    expansion: int = 8
    k: int = 32
    k_start: int = 0  # > k anneals k from k_start down to k; 0: fixed k
    k_anneal_frac: float = 0.5
    auxk: float = 1 / 32
    l1: float = 5.0
    l1_warm_up_frac: float = 0.05
    lr: float = 3e-4
    lr_warmup_tokens: int = 0
    lr_decay_frac: float = 0.2
    batch_windows: int = 256  # windows per batch (tokens per batch = batch_windows * window)
    window: int = 16
    skip_positions: int = 0  # positions [0, skip) of every sequence are never trained on (BOS)
    n_tokens: int = 10_000_000
    dead_window_tokens: int = 1_000_000
    b_dec_init: str = "geometric_median"  # | "mean" | "none"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra fields of the model config


def static_schedule(cfg: StaticTrainerConfig, start: int = 0, end: int | None = None) -> Schedule:
    """The schedule of one static run over tokens [start, end) (end defaults to start + n_tokens)."""
    end = start + cfg.n_tokens if end is None else end
    n = end - start
    sch = Schedule()
    sch["lr"] = lr_schedule(cfg.lr, end, cfg.lr_warmup_tokens, cfg.lr_decay_frac, start)
    if cfg.k_start and cfg.k_start != cfg.k:
        sch["k"] = Ramp(cfg.k_start, cfg.k, start, start + cfg.k_anneal_frac * n, "geometric")
    else:
        sch["k"] = constant(cfg.k)
    sch["l1"] = Ramp(0.0, cfg.l1, start, start + cfg.l1_warm_up_frac * n) if cfg.l1_warm_up_frac else cfg.l1
    sch["auxk"] = cfg.auxk
    return sch


def keep_known(schedule: Schedule, model: SAE) -> Schedule:
    """Drop scheduled coefficients the model's config does not know (lr always stays)."""
    schedule.fns = {k: f for k, f in schedule.fns.items() if k == "lr" or hasattr(model.cfg, k)}
    return schedule


@dataclass
class TrainResult:
    sae: SAE  # for raw activations (input scale folded in), on CPU
    loop: TrainLoop

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.loop.log.records


def new_static_model(cfg: StaticTrainerConfig, d_in: int, meta: dict[str, Any] | None = None) -> SAE:
    d_sae = cfg.d_sae or cfg.expansion * d_in
    return build_sae(cfg.architecture, d_in, d_sae, cfg.seed, k=cfg.k, auxk=cfg.auxk, l1=cfg.l1,
                     dead_window_tokens=cfg.dead_window_tokens, **(meta or {}), **cfg.model_kwargs)


def train_static(cfg: StaticTrainerConfig, data, *, out_dir: str | Path | None = None,
                 resume: str | Path | None = None, stats_mean_norm: float | None = None,
                 seq_indices=None, meta: dict[str, Any] | None = None,
                 callbacks: tuple[Callback, ...] = ()) -> TrainResult:
    """Train one static-style SAE on `data` (array [n_seq, ctx, d] or WindowBatches).

    out_dir: where checkpoints, train_log.jsonl and the final SAE go (None: nothing written).
    resume: a checkpoint folder or a previous out_dir (continues bit-identically).
    Under torch.distributed every rank calls this with the same arguments (see distributed.py);
    cfg.batch_windows is then the global batch.
    stats_mean_norm: E||x|| from the store's statistics (else estimated on a sample).
    meta: model_name / hook_name / hook_layer recorded in the SAE's cfg.json.
    """
    torch.manual_seed(cfg.seed)
    source = make_source(data, window=cfg.window, batch_size=cfg.batch_windows, seed=cfg.seed,
                         n_tokens=cfg.n_tokens, seq_indices=seq_indices,
                         skip=cfg.skip_positions, device=auto_device(cfg.device))
    sample = source.sample_sequences(256)
    scale = resolve_scale(source, sample, stats_mean_norm)
    model = new_static_model(cfg, source.d, meta)
    loop = TrainLoop(model, cfg.loop_config(), scale=scale, device=cfg.device, out_dir=out_dir)
    if resume:
        loop.resume(resume)
    else:
        loop.log.truncate_after(None)  # a fresh run starts a fresh log
        init_from_data(model, torch.from_numpy(sample).to(loop.device) * scale, cfg.b_dec_init)
    loop.dist.broadcast_module(loop.model)  # data-parallel: rank 0's weights everywhere
    loop.state["loader"] = {"seed": source.seed, "window": source.window, "batch_size": source.batch_size}
    phase = Phase(cfg.architecture, cfg.n_tokens, keep_known(static_schedule(cfg), model), callbacks)
    run_phases(loop, source.restart, [phase])
    if out_dir:
        save_run(out_dir, loop, cfg)  # rank 0 writes
    return TrainResult(loop.exported(), loop)
