"""The one training loop every trainer drives.

One step, on a batch of windows x [B, w, d] (raw activations) at global token count t:

    x      <- s * x                              s = sqrt(d) / E||x||        (scaling.py)
    c      <- schedule.at(t)                     {"lr": .., "k": .., "gate_open": .., ...}
              model.set_coeffs(c)                  (state a model holds per step, e.g. the TSAE's k)
    out    <- model(x)                           (+ a frozen teacher's outputs in out.aux when
                                                  c["distill"] > 0 and a teacher is given)
    terms  <- model.loss_terms(x, out, c)        {"loss": total, named terms ...}
    grads  <- d terms["loss"];  clip ||grads|| to grad_clip
    guard:  loss or grad norm not finite   -> skip the step, log {"event": "skipped_nan"}
            loss > spike_factor x median of the last accepted losses -> skip, {"event": "skipped_spike"}
            max_consecutive_skips skips in a row, or non-finite weights at a log point
                                             -> restore the last in-memory snapshot (taken every
                                                snapshot_every steps), {"event": "restored"}
    Adam step (lr = c["lr"]), model.after_step(), callbacks (e.g. revival)
    t <- t + B w   (tokens and batches count as consumed even when a step is skipped: they are the
                    schedule clock and the loader position)

The guard costs one device sync per step (a 2-element .tolist()); every other statistic is
accumulated on the device and synced only every `log_every` steps, when a JSONL record is written
with each loss term's mean over the interval, L0, dead fraction, scheduled coefficients (lr, k,
gate openness, ..., under "coeff/<name>"), tokens seen, tokens/s and the time spent waiting for the loader.

Checkpoints (checkpoint.py) carry model, optimiser, RNG states and `state` (step, tokens, batches,
phase, guard history, scale, plus whatever the trainer adds, e.g. the loader seed), so a trainer
that re-creates its loader at `state["batches"]` resumes bit-identically.  A resumed loop cuts the
JSONL log back to its checkpoint's step, so the log reads as one uninterrupted run.

Data-parallel (an initialised process group, distributed.py): each rank steps on its share of the
global batch; after backward the gradients and the loss are replaced by their token-weighted
global values (one all-reduce), so the guard, the clock (global tokens) and the Adam step agree on
every rank; firing/lifecycle trackers record the global batch; rank 0 alone logs and checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tsae.host_allocator import retain_freed_blocks
from tsae.models.base import SAE, SAEOutput
from tsae.train.checkpoint import (
    is_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_latest,
)
from tsae.train.distributed import current
from tsae.train.schedule import Schedule

Callback = Callable[["TrainLoop", Tensor, SAEOutput, dict[str, Tensor]], None]
Teacher = Callable[[Tensor, dict[str, float]], tuple[Tensor, Tensor]]


def clip_gradients(params: Sequence[Tensor], loss: Tensor, max_norm: float) -> tuple[float, float]:
    """Clip the gradients of `params` to total norm max_norm exactly as clip_grad_norm_ does, and
    return (loss, the norm before clipping) as floats, read in the step's one device sync.  Unlike
    clip_grad_norm_, gradients within the bound are left alone instead of multiplied by 1.0 (the
    same numbers, one pass over every gradient fewer)."""
    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    loss_v, gnorm_v = torch.stack([loss.detach(), gnorm.detach()]).tolist()
    if gnorm_v > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, gnorm)
    return loss_v, gnorm_v


def auto_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        # the explicit index: the loader's thread would otherwise copy to cuda:0 on every rank
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    return torch.device(device)


@dataclass
class LoopConfig:
    lr: float = 3e-4  # the optimiser's initial lr; the schedule's "lr" overrides it every step
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    log_every: int = 100  # steps
    checkpoint_every: int = 0  # steps; 0: only at phase ends
    keep_checkpoints: int = 2  # periodic checkpoints kept (phase-end ones are always kept)
    spike_factor: float = 10.0
    spike_window: int = 64  # accepted losses in the running median
    spike_min_history: int = 20  # no spike detection before this many accepted steps
    max_consecutive_skips: int = 20  # then restore the last snapshot; 0 disables snapshots
    snapshot_every: int = 1000  # steps between in-memory snapshots (a copy of weights + Adam state)
    dead_window_tokens: int = 1_000_000
    progress: bool = True


@dataclass
class TrainerLoopFields:
    """The loop settings every trainer config carries (StaticTrainerConfig, TSAETrainerConfig);
    `loop_config()` turns them, with the trainer's own lr and dead window, into a LoopConfig."""

    log_every: int = 100
    checkpoint_every: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def loop_config(self) -> LoopConfig:
        return LoopConfig(lr=self.lr, grad_clip=self.grad_clip, log_every=self.log_every,
                          checkpoint_every=self.checkpoint_every,
                          dead_window_tokens=self.dead_window_tokens, progress=self.progress)


class JsonlLog:
    """Append-only JSON-lines log (flushed per record); `records` keeps them in memory too."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.records: list[dict[str, Any]] = []
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int | None) -> None:
        """Keep only the file's complete records with step <= `step` (None: none); written to a
        temporary file and renamed.  A crash mid-write leaves at most one partial last line: dropped."""
        if not (self.path and self.path.is_file()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if step is not None and rec.get("step", 0) <= step:
                keep.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)


class TrainLoop:
    def __init__(self, model: SAE, cfg: LoopConfig, *, scale: float, device: str | torch.device = "auto",
                 out_dir: str | Path | None = None, log: JsonlLog | None = None):
        self.cfg, self.device, self.dist = cfg, auto_device(device), current()
        if self.device.type == "cpu":
            retain_freed_blocks()  # step temporaries reuse heap pages (host_allocator.py)
        self.model = model.to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.out_dir = Path(out_dir) if out_dir else None
        main = self.out_dir and self.dist.is_main  # only rank 0 writes
        self.log = log or JsonlLog(self.out_dir / "train_log.jsonl" if main else None)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "batches": 0, "skipped": 0, "restored": 0,
                                      "phase": "", "scale": float(scale), "history": [], "run_skips": 0}
        self._snapshot: tuple[dict, dict] | None = None

    @property
    def scale(self) -> float:
        return self.state["scale"]

    # ---- events and snapshots ----------------------------------------------------------------
    def event(self, event: str, **fields) -> None:
        s = self.state
        self.log.write({"event": event, "step": s["step"], "tokens": s["tokens"], "phase": s["phase"],
                        **fields})

    def _take_snapshot(self) -> None:
        if self.cfg.max_consecutive_skips:
            self._snapshot = ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                              copy.deepcopy(self.opt.state_dict()))

    def _restore_snapshot(self, reason: str) -> None:
        if self._snapshot is None:
            raise RuntimeError(f"training diverged ({reason}) and there is no snapshot to restore")
        self.model.load_state_dict(self._snapshot[0])
        self.opt.load_state_dict(self._snapshot[1])
        self.state["restored"] += 1
        self.state["run_skips"] = 0
        self.event("restored", reason=reason)

    # ---- the guard ---------------------------------------------------------------------------
    def _verdict(self, loss: float, gnorm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            return "skipped_nan"
        h = self.state["history"]
        if len(h) >= self.cfg.spike_min_history and loss > self.cfg.spike_factor * statistics.median(h):
            return "skipped_spike"
        return None

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, batches: Iterable, schedule: Schedule, until_tokens: int, phase: str = "",
            callbacks: Sequence[Callback] = (), teacher: Teacher | None = None) -> dict[str, Any]:
        """Train on `batches` until the global token count reaches `until_tokens` (or the batches
        run out).  Returns the loop state.

        teacher: (x, coeffs) -> (codes, x_hat) of a frozen model on the same (scaled) inputs; on
        steps with coeffs["distill"] > 0 they are put in out.aux["teacher_codes"] / ["teacher_x_hat"]
        for the model's distillation term.
        Data-parallel: `batches` yields this rank's share of each global batch; callbacks see it."""
        with self.dist.global_trackers(self.model):
            return self._run(batches, schedule, until_tokens, phase, callbacks, teacher)

    def _run(self, batches, schedule, until_tokens, phase, callbacks, teacher) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, s, model, opt = self.cfg, self.state, self.model, self.opt
        s["phase"] = phase
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self._take_snapshot()
        acc: dict[str, Tensor] = {}
        n_acc, wait, t_last, tok_last = 0, 0.0, time.perf_counter(), s["tokens"]
        bar = tqdm(total=until_tokens, initial=s["tokens"], unit="tok", unit_scale=True,
                   disable=not (cfg.progress and self.dist.is_main), desc=phase or "train", leave=False)
        it = iter(batches)
        coeffs: dict[str, float] = {}
        lr: float | None = None
        try:
            while s["tokens"] < until_tokens:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                wait += time.perf_counter() - t0
                x = batch.acts if hasattr(batch, "acts") else batch
                x = x.to(self.device, non_blocking=True) * s["scale"]

                coeffs = schedule.at(s["tokens"])
                lr = coeffs.pop("lr", None)
                if lr is not None:
                    for g in opt.param_groups:
                        g["lr"] = lr
                model.set_coeffs(coeffs)  # a no-op for models without per-step state (base.SAE)
                out = model(x)
                if teacher is not None and coeffs.get("distill", 0.0) > 0:
                    with torch.no_grad():
                        out.aux["teacher_codes"], out.aux["teacher_x_hat"] = teacher(x, coeffs)
                terms = model.loss_terms(x, out, coeffs)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                loss, n_tokens = terms["loss"].detach(), x.shape[0] * x.shape[1]
                if self.dist.active:
                    n_local = n_tokens
                    loss, n_tokens = self.dist.reduce_step(params, loss, n_local)
                loss_v, gnorm_v = clip_gradients(params, loss, cfg.grad_clip)

                s["step"] += 1
                s["batches"] += 1
                s["tokens"] += n_tokens
                verdict = self._verdict(loss_v, gnorm_v)
                if verdict:
                    opt.zero_grad(set_to_none=True)
                    s["skipped"] += 1
                    s["run_skips"] += 1
                    self.event(verdict, loss=loss_v, grad_norm=gnorm_v)
                    if cfg.max_consecutive_skips and s["run_skips"] >= cfg.max_consecutive_skips:
                        self._restore_snapshot(f"{s['run_skips']} consecutive skipped steps")
                else:
                    opt.step()
                    model.after_step()
                    s["run_skips"] = 0
                    s["history"] = (s["history"] + [loss_v])[-cfg.spike_window :]
                    for name, v in terms.items():
                        v = v.detach()
                        if self.dist.active:  # this rank's part of the global mean (summed at log)
                            v = v * (n_local / n_tokens)
                        acc[name] = acc[name] + v if name in acc else v.clone()
                    n_acc += 1
                    for cb in callbacks:
                        cb(self, x, out, terms)

                if s["step"] % cfg.log_every == 0:
                    self._log_interval(acc, n_acc, coeffs, lr, wait, t_last, tok_last)
                    bar.update(s["tokens"] - tok_last)
                    acc, n_acc, wait, t_last, tok_last = {}, 0, 0.0, time.perf_counter(), s["tokens"]
                if s["step"] % cfg.snapshot_every == 0 and not s["run_skips"]:
                    self._take_snapshot()
                if cfg.checkpoint_every and s["step"] % cfg.checkpoint_every == 0:
                    self.checkpoint(f"step_{s['step']:08d}")
        finally:
            bar.close()
            close = getattr(it, "close", None)
            if close:
                close()
        if n_acc:
            self._log_interval(acc, n_acc, coeffs, lr, wait, t_last, tok_last)
        return s

    def _log_interval(self, acc, n_acc, coeffs, lr, wait, t_last, tok_last) -> None:
        s = self.state
        dt = max(time.perf_counter() - t_last, 1e-9)
        rec: dict[str, Any] = {"step": s["step"], "tokens": s["tokens"], "phase": s["phase"]}
        if n_acc:
            names = list(acc)
            sums = self.dist.all_reduce_(torch.stack([acc[n].float() for n in names]))
            means = (sums / n_acc).tolist()
            rec.update(dict(zip(names, means, strict=True)))
        if "dead_frac" not in rec and hasattr(self.model, "activity"):
            dead = self.model.activity.dead_mask(self.cfg.dead_window_tokens)
            rec["dead_frac"] = float(dead.float().mean())
        rec["lr"] = lr if lr is not None else self.opt.param_groups[0]["lr"]
        rec.update({f"coeff/{k}": v for k, v in coeffs.items()})
        rec.update(tokens_per_s=(s["tokens"] - tok_last) / dt, loader_wait_s=wait, skipped=s["skipped"])
        self.log.write(rec)
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self._restore_snapshot("non-finite weights")

    # ---- persistence -------------------------------------------------------------------------
    def checkpoint(self, name: str) -> Path | None:
        """Save a checkpoint under out_dir/checkpoints/<name> and point `latest` at it (rank 0 only:
        every rank holds the same model, optimiser and state)."""
        if self.out_dir is None or not self.dist.is_main:
            return None
        root = self.out_dir / "checkpoints"
        path = save_checkpoint(root / name, self.model, self.opt, self.state)
        write_latest(root, name)
        periodic = sorted(p for p in root.glob("step_*") if p.is_dir() and is_checkpoint(p))
        for old in periodic[: max(len(periodic) - self.cfg.keep_checkpoints, 0)]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        self.event("checkpoint", checkpoint=name)
        return path

    def resume(self, folder: str | Path) -> dict[str, Any]:
        """Restore model, optimiser, RNGs and state from a checkpoint folder (or a run folder with
        checkpoints/: its latest complete checkpoint); the log is cut back to the checkpoint's step."""
        folder = Path(folder)
        if (folder / "checkpoints").is_dir():
            found = latest_checkpoint(folder / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"{folder / 'checkpoints'} holds no complete checkpoint")
            folder = found
        self.state = load_checkpoint(folder, self.model, self.opt)
        self.log.truncate_after(self.state["step"])
        self.event("resumed", checkpoint=str(folder))
        return self.state

    def exported(self) -> SAE:
        """A CPU copy of the model for raw activations (the input scale folded in)."""
        model = copy.deepcopy(self.model).cpu().eval()
        model.fold_input_scale(self.scale)
        return model

    def export(self, folder: str | Path) -> Path:
        return self.exported().save(folder)
