"""Plumbing shared by the trainers: data -> loader, input scale, model construction and init, phases,
and the saved run folder.

A run folder (`out_dir`) ends up holding

    cfg.json, sae_weights.safetensors   the SAE for raw activations (input scale folded in)
    trainer_cfg.json                    the trainer config dataclass (+ the scale and final counters)
    train_log.jsonl                     one JSON record per log interval, and events
    checkpoints/                        step_*/ and phase_*/ checkpoints, `latest` names the newest
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsae.data.windows import WindowBatches
from tsae.models.base import SAE
from tsae.models.registry import sae_class
from tsae.train.distributed import current
from tsae.train.loop import Callback, Teacher, TrainLoop
from tsae.train.scaling import input_scale, mean_norm
from tsae.train.schedule import Schedule

TRAINER_CONFIG_FILE = "trainer_cfg.json"


def make_source(data, *, window: int, batch_size: int, seed: int, n_tokens: int,
                seq_indices=None, skip: int = 0, device: str | torch.device = "cpu") -> WindowBatches:
    """A WindowBatches stream of n_tokens tokens over `data` (an array [n_seq, ctx, d] or a
    ready WindowBatches, used as given).  On a GPU `device`, the loader thread pins each batch and
    copies it to the device, off the training thread.  Data-parallel: this rank's share of every
    global batch of `batch_size` windows."""
    dist = current()
    if isinstance(data, WindowBatches):
        if (data.rank, data.world_size) != (dist.rank, dist.world_size):
            raise ValueError(f"a WindowBatches for rank {data.rank} of {data.world_size} given to rank "
                             f"{dist.rank} of {dist.world_size}; pass rank= and world_size=, or the array")
        return data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    return WindowBatches(data, window=window, batch_size=batch_size, seed=seed, n_tokens=n_tokens,
                         seq_indices=seq_indices, skip=skip, device=device, rank=dist.rank,
                         world_size=dist.world_size)


def resolve_scale(source: WindowBatches, sample: np.ndarray, stats_mean_norm: float | None) -> float:
    """s = sqrt(d) / E||x|| (rank 0's value on every rank)."""
    norm = stats_mean_norm if stats_mean_norm is not None else mean_norm(sample)
    return current().broadcast_object(input_scale(norm, source.d))


def build_sae(architecture: str, d_in: int, d_sae: int, seed: int, **fields: Any) -> SAE:
    """Instantiate a registered SAE, passing only the fields its config class declares."""
    cls = sae_class(architecture)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = set(fields) - names
    given = {k: v for k, v in fields.items() if k in names}
    if unknown - _OPTIONAL_FIELDS:
        raise ValueError(f"{architecture} config has no field(s) {sorted(unknown - _OPTIONAL_FIELDS)}")
    return cls(cls.config_class(d_in=d_in, d_sae=d_sae, seed=seed, **given))


# Trainer-level knobs that only some architectures have (silently skipped for the others).
_OPTIONAL_FIELDS = {"k", "auxk", "l1", "dead_window_tokens", "model_name", "hook_name", "hook_layer"}


@torch.no_grad()
def init_from_data(model: SAE, scaled_sample: torch.Tensor, method: str) -> None:
    """b_dec at the geometric median (or mean) of a scaled data sample, when the model has one."""
    if method != "none" and hasattr(model, "init_b_dec"):
        model.init_b_dec(scaled_sample, method)


@dataclass
class Phase:
    name: str
    end_tokens: int  # global token count at which the phase ends
    schedule: Schedule
    callbacks: Sequence[Callback] = ()
    teacher: Teacher | None = None


def run_phases(loop: TrainLoop, make_batches: Callable[[int], Iterable], phases: Sequence[Phase]) -> None:
    """Run each phase not yet completed (by token count), each from a loader re-created at the
    loop's batch position; checkpoint at every phase end."""
    for ph in phases:
        if loop.state["tokens"] >= ph.end_tokens:
            continue
        loop.run(make_batches(loop.state["batches"]), ph.schedule, ph.end_tokens, ph.name, ph.callbacks,
                 ph.teacher)
        if loop.state["tokens"] < ph.end_tokens:
            loop.event("data_exhausted", wanted_tokens=ph.end_tokens)
        loop.checkpoint(f"phase_{ph.name}")


def save_run(folder: str | Path, loop: TrainLoop, trainer_cfg: Any) -> Path:
    """Write the final SAE and trainer_cfg.json (rank 0; the others wait until it is written)."""
    folder = Path(folder)
    if not loop.dist.is_main:
        loop.dist.barrier()
        return folder
    loop.export(folder)
    doc = {**dataclasses.asdict(trainer_cfg), "trainer": type(trainer_cfg).__name__,
           "input_scale": loop.scale, "final": {k: loop.state[k] for k in ("step", "tokens", "skipped")}}
    tmp = folder / (TRAINER_CONFIG_FILE + ".tmp")  # the file that marks a finished run: atomic
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    tmp.replace(folder / TRAINER_CONFIG_FILE)
    loop.dist.barrier()
    return folder
