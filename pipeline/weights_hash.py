"""Identifying a model's weights: the sha256 a store's key and attributes record.

`state_dict_sha256` hashes tensors (name, dtype, shape, bytes); `folder_weights_hash` hashes the
weight files of a model folder or hub snapshot, memoised by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def state_dict_sha256(state_dict) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_weights_hash(folder: Path, models_dir: Path) -> str:
    """sha256 of the weight files' names and bytes, memoised under `models_dir/weight-hashes/` keyed
    by the files' paths, sizes and modification times."""
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelError(f"{folder} holds no weight files (*.safetensors, *.bin)")
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
    memo = models_dir / "weight-hashes" / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\n")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value + "\n")
    except OSError:
        pass  # a read-only cache home only costs a re-hash next time
    return value
