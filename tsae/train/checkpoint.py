"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder holds

    model.safetensors   the model's state dict (parameters and buffers: firing/lifecycle trackers)
    optim.safetensors   the optimiser's per-parameter tensors, keyed "state.{param_index}.{name}"
    rng.safetensors     torch CPU (and CUDA) generator states
    state.json          optimiser param groups and non-tensor state, python and numpy RNG states,
                        and the trainer's own `state` dict (step, tokens, batches consumed, loader
                        seed, phase, guard history, input scale, ...)

It is written to `<folder>.tmp` and renamed, so a crash mid-write never leaves a half checkpoint.
`load_checkpoint` restores model, optimiser and RNGs in place and returns the trainer state.

A checkpoints root holds the folders and `latest`, a text file naming the newest one, replaced
atomically (written to `latest.tmp`, then renamed).  `latest_checkpoint(root)` trusts `latest` when
it names a complete folder, else takes the complete folder with the most steps, so a process killed
at any instant (mid-write, between two renames) resumes from its last complete checkpoint.  This is
about process crashes: files are not fsync'ed, so a power loss may still lose recent writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def _optim_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    return tensors, {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_states(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optim_split(optimizer)
    save_file(opt_tensors, str(tmp / "optim.safetensors"))
    rng_tensors, rng_meta = _rng_states()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    doc = {"trainer": state, "optimizer": opt_meta, "rng": rng_meta}
    (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1))
    old = folder.with_name(folder.name + ".old")  # an existing checkpoint of that name is replaced
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def write_latest(root: str | Path, name: str) -> None:
    """Point root/latest at checkpoint `name`, atomically."""
    tmp = Path(root) / "latest.tmp"
    tmp.write_text(name)
    os.replace(tmp, Path(root) / "latest")


def is_checkpoint(folder: str | Path) -> bool:
    """A complete checkpoint folder (the state file is written last, inside the temporary folder)."""
    folder = Path(folder)
    return folder.suffix not in (".tmp", ".old") and (folder / STATE_FILE).is_file()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder `root/latest` names if complete, else the complete checkpoint with most steps."""
    root = Path(root)
    named = root / (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if named is not None and named != root and is_checkpoint(named):
        return named
    done = [p for p in root.iterdir() if p.is_dir() and is_checkpoint(p)] if root.is_dir() else []
    return max(done, key=lambda p: (read_state(p)["step"], p.stat().st_mtime), default=None)


def read_state(folder: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, without touching any model."""
    return json.loads((Path(folder) / STATE_FILE).read_text())["trainer"]


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore model (and optimiser, RNGs) in place from `folder`; returns the trainer state."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_FILE})")
    doc = json.loads((folder / STATE_FILE).read_text())
    device = next(iter(model.parameters())).device
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    if optimizer is not None:
        optimizer.load_state_dict(_optim_join(load_file(str(folder / "optim.safetensors")), doc["optimizer"]))
    if restore_rng:
        _set_rng_states(load_file(str(folder / "rng.safetensors")), doc["rng"])
    return doc["trainer"]
