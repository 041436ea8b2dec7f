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

from pipeline.errors import StoreError

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


def array_specs(hooks: list[str], ctx: int, d_model: int, store_dtype: str) -> dict[str, tuple]:
    """Array name -> (shape of one sequence's row, dtype)."""
    out = {acts_name(h): ((ctx, d_model), store_dtype) for h in hooks}
    out.update({TOKENS: ((ctx,), "int32"), DOC_ID: ((), "int64"), DOC_OFFSET: ((), "int64")})
    return out


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


def open_group(store, mode: str):
    """``zarr.open_group``; root metadata that zarr cannot use raises `StoreError`."""
    import zarr

    try:
        return zarr.open_group(store, mode=mode)
    except Exception as e:  # zarr raises several types (GroupNotFoundError, ValueError, ...)
        raise StoreError(f"zarr.json is unusable ({type(e).__name__}); the store is damaged") from None


class StoreUnreachable(StoreError):
    """The object store holding a store could not be asked (not: the store is damaged)."""


def object_store_error(e: BaseException, where) -> StoreUnreachable | None:
    """A one-line StoreError for an object-store client failure (no server, no credentials, ...),
    None for any other error.  The S3 client's exceptions are not OSErrors, so they would escape as
    tracebacks; every first request of a command goes through `read_key` or `list_stores`."""
    if type(e).__module__.split(".")[0] not in ("botocore", "aiobotocore", "aiohttp"):
        return None
    return StoreUnreachable(f"cannot reach {where}: {' '.join(str(e).split()) or type(e).__name__}")


def read_key(store, key: str) -> bytes | None:
    """One small file of the store (``None`` if absent), through zarr's store API so URLs work too."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except Exception as e:
        raise (object_store_error(e, f"{getattr(store, 'path', store)}/{key}") or e) from None
    return None if buf is None else buf.to_bytes()


def write_key(store, key: str, data: bytes) -> None:
    """Replace one small file; LocalStore writes through a temporary file and a rename (atomic)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))
    except Exception as e:
        raise (object_store_error(e, f"{getattr(store, 'path', store)}/{key}") or e) from None


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
        """Parse manifest.json; a malformed one raises `StoreError` (never a parser's exception)."""
        try:
            d = json.loads(data)
            problem = _manifest_problem(d)
        except (ValueError, UnicodeDecodeError) as e:
            problem = f"not JSON ({e})"
        if problem:
            raise StoreError(f"manifest.json is damaged: {problem}; remove the store and build it again")
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


# ------------------------------------------------------------------------------- damaged metadata
def _int(x, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers(x, n: int | None = None) -> bool:
    return isinstance(x, list) and all(_num(v) for v in x) and (n is None or len(x) == n)


def _manifest_problem(d) -> str | None:
    """Why a parsed manifest.json cannot be used (None if its fields have the right types/shapes)."""
    if not isinstance(d, dict):
        return "not an object"
    for k, lo in (("chunk_seqs", 1), ("batch_size", 1), ("completed_chunks", 0), ("n_seq", 0)):
        if not _int(d.get(k), lo):
            return f"{k} is {d.get(k)!r}"
    digests, sums = d.get("checksums"), d.get("sums")
    if not isinstance(digests, dict) or not all(
        isinstance(v, list) and len(v) == d["completed_chunks"] and all(isinstance(h, str) for h in v)
        for v in digests.values()
    ):
        return "checksums are not one digest per completed chunk"
    if not isinstance(sums, dict) or not all(
        isinstance(s, dict)
        and _numbers(s.get("sum"))
        and _num(s.get("sum_norm"))
        and _num(s.get("sum_sq_norm"))
        and _int(s.get("count"))
        for s in sums.values()
    ):
        return "stat sums are malformed"
    if len({len(s["sum"]) for s in sums.values()}) > 1:
        return "stat sums differ in width"
    return None


def attrs_problem(a: dict) -> str | None:
    """Why a store's root attributes cannot be used (None if every field a reader, verify, resume
    or repair relies on is present with the right type)."""
    if not (isinstance(a.get("key"), str) and a["key"]):
        return f"key is {a.get('key')!r}"
    hooks = a.get("hooks")
    if not (isinstance(hooks, list) and hooks and all(isinstance(h, str) and h for h in hooks)):
        return f"hooks are {hooks!r}"
    for k in ("ctx", "d_model", "chunk_seqs"):
        if not _int(a.get(k), 1):
            return f"{k} is {a.get(k)!r}"
    if a.get("inner_seqs") is not None and not _int(a["inner_seqs"], 1):
        return f"inner_seqs is {a['inner_seqs']!r}"
    if a.get("store_dtype") not in ("float16", "float32"):
        return f"store_dtype is {a.get('store_dtype')!r}"
    if a.get("status") not in (STATUS_BUILDING, STATUS_COMPLETE):
        return f"status is {a.get('status')!r}"
    m = a.get("model")
    if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("spec"), str)):
        return "model is malformed"
    if not isinstance(m.get("weights_hash"), (str, type(None))):
        return "model.weights_hash is malformed"
    d = a.get("dataset")
    if not (
        isinstance(d, dict)
        and all(isinstance(d.get(k), str) for k in ("dataset", "text_column", "fingerprint"))
        and all(isinstance(d.get(k), (str, type(None))) for k in ("split", "config"))
    ):
        return "dataset is malformed"
    if not isinstance(a.get("tokenizer", {}), dict):
        return "tokenizer is malformed"
    if not isinstance(a.get("prepend_bos"), bool) or not isinstance(a.get("dtype"), str):
        return "prepend_bos or dtype is malformed"
    if a.get("max_tokens") is not None and not _int(a["max_tokens"], 1):
        return f"max_tokens is {a['max_tokens']!r}"
    if a["status"] == STATUS_COMPLETE:
        if not _int(a.get("n_seq"), 1):
            return f"n_seq is {a.get('n_seq')!r}"
        stats = a.get("stats")
        if not isinstance(stats, dict) or not all(
            isinstance(stats.get(h), dict)
            and _numbers(stats[h].get("mean"), a["d_model"])
            and all(_num(stats[h].get(k)) for k in ("mean_norm", "mean_sq_norm"))
            and _int(stats[h].get("count"))
            for h in hooks
        ):
            return "stats are malformed"
    return None


def manifest_problem(m: Manifest, hooks: list[str], d_model: int, chunk_seqs: int) -> str | None:
    """Why a parsed manifest does not fit its store's attributes (None if it does)."""
    c, n = m.completed_chunks, m.n_seq
    if m.chunk_seqs != chunk_seqs:
        return f"chunk_seqs {m.chunk_seqs}, the attributes say {chunk_seqs}"
    if not ((c == 0 and n == 0) or (c - 1) * chunk_seqs < n <= c * chunk_seqs):
        return f"{n} sequences cannot fill {c} chunks of {chunk_seqs}"
    if set(m.sums) != set(hooks) or any(len(s.sum) != d_model for s in m.sums.values()):
        return "stat sums do not match the hooks"
    if c and set(m.checksums) != set(array_names(hooks)):
        return "checksums do not name the store's arrays"
    return None
