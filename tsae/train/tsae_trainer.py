"""Three-phase training of the temporal SAE from a pretrained static TopK SAE.

With phase boundaries P1 = distill_tokens, P2 = P1 + introduce_tokens, P3 = P2 + refine_tokens
(global token counts t), one schedule drives all phases:

    phase      tokens      gate_open(t)              distill(t)        k(t)
    distill    [0, P1)     0   (temporal path shut)  1                 k_start -> k (geometric
    introduce  [P1, P2)    0 -> 1 (gate_shape ramp)  1 -> 0 (linear)     over [0, P2]), then k
    refine     [P2, P3)    1                         0
    lr: warm-up over lr_warmup_tokens, constant, linear decay over the last lr_decay_frac of P3.

* distill: the TSAE starts as an exact copy of the static SAE (`TemporalSAE.from_static`).  Its
  loss adds ||f - f_teacher||^2 + ||x_hat - x_hat_teacher||^2 against the *frozen* static SAE run
  at the step's k (the loop puts the teacher's outputs in out.aux), so the dictionary stays
  anchored while the sparsity anneals.
* introduce: the temporal path (memory, gates, bridges) opens progressively while the anchor is
  released.
* refine: every parameter on reconstruction + sparsity (+ aux-k) alone.
All parameters are trainable in every phase; the phases differ only in coefficients.

Revival: every `revive_every_tokens` in the phases listed in `revive_phases`, latents the model's
LifecycleTracker marks dead over `dead_window_tokens` (never-born ones included) are re-pointed at
badly reconstructed tokens of the current batch (`TemporalSAE.revive_dead`) and the Adam moments of
every parameter entry this rewrote are reset; logged as {"event": "revived"}.  Data-parallel: rank 0
revives on the gathered global batch and broadcasts the model.

The input scale is the one that makes the static SAE's decoder rows unit norm (s = 1 / median
row norm of the static SAE for raw activations): for a static SAE trained by `train_static` this
is exactly its training scale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tsae.models.base import SAE
from tsae.models.registry import load_sae
from tsae.models.topk import TopKSAE, sparse_decode, topk_parts
from tsae.models.tsae import TemporalSAE
from tsae.train.checkpoint import latest_checkpoint
from tsae.train.loop import Callback, TrainerLoopFields, TrainLoop, auto_device
from tsae.train.schedule import Ramp, Schedule, lr_schedule
from tsae.train.setup import Phase, make_source, run_phases, save_run
from tsae.train.static_trainer import StaticTrainerConfig, TrainResult, train_static

PHASES = ("distill", "introduce", "refine")


@dataclass
class TSAETrainerConfig(TrainerLoopFields):
    k: int = 32  # target k (the TSAE's k at inference)
    k_start: int = 0  # > 0: anneal k_start -> k over the distill and introduce phases
    distill_tokens: int = 1_000_000
    introduce_tokens: int = 4_000_000
    refine_tokens: int = 5_000_000
    gate_shape: str = "cosine"  # shape of the gate_open warm-up ramp
    memory_window: int = 16  # the TSAE's memory window w
    lstm_hidden: int = 32  # the TSAE default: 0.61x TopK model speed (h=64: 0.52x), docs/architecture.md
    lr: float = 3e-4
    lr_warmup_tokens: int = 0
    lr_decay_frac: float = 0.2
    auxk: float = 1 / 32
    gate_l1: float = 0.0
    batch_windows: int = 64
    window: int = 64  # training window (consecutive positions per sample), >= memory_window
    skip_positions: int = 0  # positions [0, skip) of every sequence are never trained on (BOS)
    dead_window_tokens: int = 1_000_000
    revive_every_tokens: int = 0  # 0: no revival beyond aux-k
    revive_phases: tuple[str, ...] = ("introduce", "refine")
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # TSAEConfig overrides (ablations)
    static: StaticTrainerConfig = field(default_factory=StaticTrainerConfig)  # when no static SAE given

    @property
    def boundaries(self) -> tuple[int, int, int]:
        p1 = self.distill_tokens
        p2 = p1 + self.introduce_tokens
        return p1, p2, p2 + self.refine_tokens

    @property
    def n_tokens(self) -> int:
        return self.boundaries[2]


def tsae_schedule(cfg: TSAETrainerConfig) -> Schedule:
    p1, p2, p3 = cfg.boundaries
    sch = Schedule()
    sch["lr"] = lr_schedule(cfg.lr, p3, cfg.lr_warmup_tokens, cfg.lr_decay_frac)
    sch["gate_open"] = Ramp(0.0, 1.0, p1, p2, cfg.gate_shape)
    sch["distill"] = Ramp(1.0, 0.0, p1, p2)
    k_start = cfg.k_start or cfg.k
    sch["k"] = Ramp(k_start, cfg.k, 0, p2, "geometric") if k_start != cfg.k else float(cfg.k)
    sch["auxk"] = cfg.auxk
    sch["gate_l1"] = cfg.gate_l1
    return sch


@torch.no_grad()
def reset_moments(opt: torch.optim.Optimizer, before: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Zero Adam's moments at every parameter entry that differs from `before` (rewritten entries)."""
    for p, old in before.items():
        st = opt.state.get(p)
        if not st:
            continue
        changed = p != old
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                st[name][changed] = 0.0


def static_teacher(sae: TopKSAE):
    """The frozen static SAE as a distillation target, at the step's k (so annealing k does not
    make the student's and the teacher's codes incomparable).  Its x_hat is decoded from the k
    nonzero codes (no gradient flows into the teacher), which halves its cost per step."""

    def run(x, coeffs):
        values, idx = topk_parts(sae.pre_activations(x), int(coeffs.get("k", sae.cfg.k)))
        codes = x.new_zeros(*x.shape[:-1], sae.cfg.d_sae).scatter_(-1, idx, values)
        return codes, sparse_decode(values, idx, sae.W_dec) + sae.b_dec

    return run


def reviver(cfg: TSAETrainerConfig):
    """Callback: revive latents dead over cfg.dead_window_tokens every cfg.revive_every_tokens."""

    def revive(loop: TrainLoop, x, out, terms) -> None:
        s, model = loop.state, loop.model
        if s["tokens"] < s.get("next_revive", cfg.revive_every_tokens):
            return
        s["next_revive"] = s["tokens"] + cfg.revive_every_tokens
        life = model.lifecycle
        dead = life.dead_mask(cfg.dead_window_tokens) & (life.tokens_seen >= cfg.dead_window_tokens)
        dead = loop.dist.broadcast_(dead)  # rank 0 decides (trackers agree; the collectives must too)
        never = life.never_born_mask()
        if not dead.any():
            return
        before = {p: p.detach().clone() for p in model.parameters()}
        x = loop.dist.gather_rows(x.detach())  # data-parallel: the global batch, as on one process
        n = model.revive_dead(dead, x) if loop.dist.is_main else 0
        loop.dist.broadcast_module(model)  # rank 0 revives (it draws the tokens), every rank follows
        n = loop.dist.broadcast_object(n)
        reset_moments(loop.opt, before)
        loop.event("revived", n=n, never_born=int((dead & never).sum()))

    return revive


def _static_sae(static, cfg: TSAETrainerConfig, data, out_dir: Path | None, **kw) -> TopKSAE:
    """The static TopK SAE for raw activations: given, loaded from a folder, or trained here."""
    if isinstance(static, str | Path):
        static = load_sae(static)
    if static is None:
        folder = out_dir / "static" if out_dir else None
        if folder and (folder / "cfg.json").is_file():
            static = load_sae(folder)
        else:
            resume = folder if folder and latest_checkpoint(folder / "checkpoints") else None
            scfg = copy.deepcopy(cfg.static)
            scfg.architecture = "topk"
            static = train_static(scfg, data, out_dir=folder, resume=resume, **kw).sae
    if not isinstance(static, TopKSAE) or isinstance(static, TemporalSAE):
        raise TypeError(f"the TSAE starts from a static TopK SAE, got {type(static).__name__}")
    return static


def train_tsae(cfg: TSAETrainerConfig, data, *, static: SAE | str | Path | None = None,
               out_dir: str | Path | None = None, resume: str | Path | None = None,
               stats_mean_norm: float | None = None, seq_indices=None,
               meta: dict[str, Any] | None = None, callbacks: tuple[Callback, ...] = ()) -> TrainResult:
    """Train a TemporalSAE in three phases (see module doc) on `data` (array or WindowBatches).

    static: a TopKSAE for raw activations (e.g. `train_static(...).sae`, `load_saelens(...)`), or a
    folder; None trains one first with cfg.static (into out_dir/static).
    Other arguments as for `train_static`; callbacks run after every accepted step of every phase.
    """
    out_dir = Path(out_dir) if out_dir else None
    torch.manual_seed(cfg.seed)
    static = _static_sae(static, cfg, data, out_dir, stats_mean_norm=stats_mean_norm,
                         seq_indices=seq_indices, meta=meta)
    scale = float(1.0 / static.W_dec.detach().norm(dim=-1).median())
    teacher = copy.deepcopy(static).cpu()
    teacher.fold_input_scale(1.0 / scale)  # now acts on scaled inputs, unit-norm decoder rows
    overrides = dict(k=cfg.k, window=cfg.memory_window, lstm_hidden=cfg.lstm_hidden, auxk=cfg.auxk,
                     dead_window_tokens=cfg.dead_window_tokens, gate_l1=cfg.gate_l1, seed=cfg.seed,
                     **(meta or {}), **cfg.model_kwargs)
    model = TemporalSAE.from_static(copy.deepcopy(teacher), **overrides)
    teacher.eval().requires_grad_(False)

    loop = TrainLoop(model, cfg.loop_config(), scale=scale, device=cfg.device, out_dir=out_dir)
    teacher.to(loop.device)
    if resume:
        loop.resume(resume)
    else:
        loop.log.truncate_after(None)  # a fresh run starts a fresh log
    loop.dist.broadcast_module(loop.model)  # data-parallel: rank 0's weights everywhere
    loop.dist.broadcast_module(teacher)
    source = make_source(data, window=cfg.window, batch_size=cfg.batch_windows, seed=cfg.seed,
                         n_tokens=cfg.n_tokens, seq_indices=seq_indices,
                         skip=cfg.skip_positions, device=auto_device(cfg.device))
    loop.state["loader"] = {"seed": source.seed, "window": source.window, "batch_size": source.batch_size}
    sch = tsae_schedule(cfg)
    revive = (reviver(cfg),) if cfg.revive_every_tokens else ()
    phases = [Phase(name, end, sch, (*(revive if name in cfg.revive_phases else ()), *callbacks),
                    static_teacher(teacher))
              for name, end in zip(PHASES, cfg.boundaries, strict=True)]
    run_phases(loop, source.restart, phases)
    if out_dir:
        save_run(out_dir, loop, cfg)
    return TrainResult(loop.exported(), loop)
