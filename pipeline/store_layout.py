"""Where an activation store lives and what is inside it: names, locations, manifest, checksums, stats.

Shared by the writer (`store_writer.py`), the reader (`store.py`) and `verify.py`, so the three agree
on one layout.  A store is one zarr v3 group:

    <store>/zarr.json                          root attributes (model, hooks, dataset, status, stats, ...)
    <store>/manifest.json                      completed-chunk prefix, per-chunk sha256, running stat sums
    <store>/acts/<hook>   float16|float32      [n_seq, ctx, d_model]
    <store>/tokens        int32                [n_seq, ctx]
    <store>/doc_id        int64                [n_seq]
    <store>/doc_offset    int64                [n_seq]

Chunk c holds sequences [c * chunk_seqs, (c + 1) * chunk_seqs) of every array; a chunk is the unit of
writing, checksumming, resuming and verifying.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
FORMAT_TAG = "tsae-activation-store"  # root attribute "format" holds this; how `ls` recognises a store
MANIFEST_KEY = "manifest.json"
LOCK_FILE = ".build.lock"
TOKENS, DOC_ID, DOC_OFFSET = "tokens", "doc_id", "doc_offset"
STATUS_BUILDING, STATUS_COMPLETE = "building", "complete"
CHECKSUM = "sha256"  # of each chunk's decoded bytes, C order, little-endian, stored dtype


def acts_name(hook: str) -> str:
    """Array name of one hook's activations, e.g. ``acts/blocks.6.hook_resid_post``."""
    return f"acts/{hook}"


def array_names(hooks: list[str]) -> list[str]:
    return [acts_name(h) for h in hooks] + [TOKENS, DOC_ID, DOC_OFFSET]


# ----------------------------------------------------------------------------------------- locations
def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def normalise(location: str | Path) -> str | Path:
    """A local ``Path`` for paths and ``file://`` URLs; other URLs (``memory://``, ``s3://``) as strings."""
    if isinstance(location, str) and location.startswith("file://"):
        return Path(location[len("file://") :])
    return location if is_url(location) else Path(location).expanduser()


def join(location: str | Path, name: str) -> str | Path:
    location = normalise(location)
    return f"{location.rstrip('/')}/{name}" if isinstance(location, str) else location / name


def zarr_store(location: str | Path, *, read_only: bool):
    """A zarr store object for a local path (``LocalStore``) or an fsspec URL (``FsspecStore``)."""
    import zarr.storage

    location = normalise(location)
    if isinstance(location, str):
        return zarr.storage.FsspecStore.from_url(location, read_only=read_only)
    return zarr.storage.LocalStore(location, read_only=read_only)


def read_key(store, key: str) -> bytes | None:
    """One small file of the store (``None`` if absent), through zarr's store API so URLs work too."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def write_key(store, key: str, data: bytes) -> None:
    """Replace one small file; LocalStore writes through a temporary file and a rename (atomic)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def to_json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# ----------------------------------------------------------------------------- per-chunk quantities
def checksum(arr: np.ndarray) -> str:
    """sha256 of an array's bytes in C order, as stored (the dtype is part of what is checked)."""
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def _float32(a: np.ndarray) -> np.ndarray:
    """Exact float16 -> float32.  torch converts ~4x faster than numpy, so it is used when already
    imported (as in a build); verify and other light readers take numpy's path, same values."""
    torch = sys.modules.get("torch")
    if torch is not None and a.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()
    return a.astype(np.float32)


@dataclass
class StatSums:
    """Float64 running sums over tokens of one hook, from which the stats follow exactly.

    mean = sum / count,  mean_norm = sum_norm / count,  mean_sq_norm = sum_sq_norm / count,
    where ``norm`` is the Euclidean norm of one token's activation vector as stored.
    """

    sum: np.ndarray
    sum_norm: float = 0.0
    sum_sq_norm: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, d: int) -> StatSums:
        return cls(np.zeros(d, dtype=np.float64))

    @classmethod
    def of(cls, acts: np.ndarray) -> StatSums:
        """Sums of one chunk ``[n, ctx, d]``: float32 products, float64 accumulation."""
        x = _float32(acts.reshape(-1, acts.shape[-1]))
        sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
        return cls(x.sum(axis=0, dtype=np.float64), float(np.sqrt(sq).sum()), float(sq.sum()), len(x))

    def __add__(self, other: StatSums) -> StatSums:
        return StatSums(
            self.sum + other.sum,
            self.sum_norm + other.sum_norm,
            self.sum_sq_norm + other.sum_sq_norm,
            self.count + other.count,
        )

    def to_json(self) -> dict:
        return {
            "sum": self.sum.tolist(),
            "sum_norm": self.sum_norm,
            "sum_sq_norm": self.sum_sq_norm,
            "count": self.count,
        }

    @classmethod
    def from_json(cls, d: dict) -> StatSums:
        return cls(np.asarray(d["sum"], dtype=np.float64), d["sum_norm"], d["sum_sq_norm"], d["count"])

    def stats(self) -> dict:
        """The attribute form: mean vector, mean norm, mean squared norm and token count."""
        n = max(self.count, 1)
        return {
            "mean": (self.sum / n).tolist(),
            "mean_norm": self.sum_norm / n,
            "mean_sq_norm": self.sum_sq_norm / n,
            "count": self.count,
        }


@dataclass
class Manifest:
    """What the single writer has durably finished: a prefix of chunks, their checksums and stat sums.

    Chunks are written in order by one thread, so the completed set is always the prefix
    ``[0, completed_chunks)``; ``n_seq`` counts its sequences (the last chunk may be short).
    """

    chunk_seqs: int
    batch_size: int
    completed_chunks: int = 0
    n_seq: int = 0
    checksums: dict[str, list[str]] = field(default_factory=dict)  # array name -> one hex per chunk
    sums: dict[str, StatSums] = field(default_factory=dict)  # hook -> running sums

    def to_bytes(self) -> bytes:
        return to_json(
            {
                "format_version": FORMAT_VERSION,
                "chunk_seqs": self.chunk_seqs,
                "batch_size": self.batch_size,
                "completed_chunks": self.completed_chunks,
                "n_seq": self.n_seq,
                "checksum": CHECKSUM,
                "checksums": self.checksums,
                "sums": {h: s.to_json() for h, s in self.sums.items()},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        return cls(
            d["chunk_seqs"],
            d["batch_size"],
            d["completed_chunks"],
            d["n_seq"],
            d["checksums"],
            {h: StatSums.from_json(s) for h, s in d["sums"].items()},
        )

    def chunk_range(self, c: int, n_seq: int | None = None) -> tuple[int, int]:
        """Sequence range ``[start, stop)`` of chunk ``c``."""
        n = self.n_seq if n_seq is None else n_seq
        return c * self.chunk_seqs, min((c + 1) * self.chunk_seqs, n)
