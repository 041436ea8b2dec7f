"""Check a store against what its writer recorded: shapes, every chunk's sha256, finite values, stats.

Every chunk of every array is read back (so a truncated or undecodable chunk file shows up), hashed
and compared with the manifest; a chunk file that is absent (zarr would silently read zeros) is named
as missing.  Activations must be finite, token ids inside the vocabulary, and the float64 stat sums
recomputed from the stored values must agree with the stored statistics.  Each problem names the
array, the chunk and its sequence range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import read_attrs, resolve
from pipeline.store_layout import (
    MANIFEST_KEY,
    STATUS_COMPLETE,
    TOKENS,
    Manifest,
    StatSums,
    acts_name,
    array_names,
    checksum,
    manifest_problem,
    read_key,
    zarr_store,
)


@dataclass
class VerifyReport:
    key: str
    location: str
    n_seq: int = 0
    n_chunks: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    damaged: dict[int, set[str]] = field(default_factory=dict)  # chunk -> names of its damaged arrays
    structural: list[str] = field(default_factory=list)  # problems no chunk rewrite can fix
    sums: dict[str, StatSums] = field(default_factory=dict)  # hook -> stat sums recomputed from the data

    @property
    def ok(self) -> bool:
        return not self.problems

    def _chunk(self, c: int, name: str, problem: str) -> None:
        self.problems.append(problem)
        self.damaged.setdefault(c, set()).add(name)

    def _structural(self, problem: str) -> None:
        self.problems.append(problem)
        self.structural.append(problem)


def verify_store(path_or_key, cache_dir=None, *, progress: bool = False) -> VerifyReport:
    """Verify the store (complete or not); problems are listed, not raised.  A missing store raises."""
    import zarr
    from zarr.core.sync import sync

    t0 = time.perf_counter()
    location = resolve(path_or_key, cache_dir)
    attrs = read_attrs(location)
    if attrs is None:
        raise StoreError(f"no activation store at {location}")
    rep = VerifyReport(attrs["key"], str(location))
    store = zarr_store(location, read_only=True)
    raw = read_key(store, MANIFEST_KEY)
    if raw is None:
        rep._structural("manifest.json is missing: no chunk can be checked")
        return rep
    try:
        m = Manifest.from_bytes(raw)
    except StoreError as e:
        rep._structural(str(e))
        return rep
    problem = manifest_problem(m, list(attrs["hooks"]), int(attrs["d_model"]), int(attrs["chunk_seqs"]))
    if problem:
        rep._structural(f"manifest.json does not fit the store: {problem}")
        return rep
    try:
        group = zarr.open_group(store, mode="r")
    except Exception as e:  # zarr.json has our attributes but not zarr's own fields
        rep._structural(f"zarr.json is unreadable by zarr ({type(e).__name__})")
        return rep
    complete = attrs.get("status") == STATUS_COMPLETE
    n_seq = int(attrs["n_seq"]) if complete else m.n_seq
    rep.n_seq, rep.n_chunks = n_seq, m.completed_chunks
    if not complete:
        rep.problems.append(
            f"store is incomplete (status {attrs.get('status')!r}, {m.completed_chunks} chunks "
            f"done); the completed chunks are checked below"
        )
    elif m.n_seq != n_seq or m.completed_chunks != -(-n_seq // m.chunk_seqs):
        rep._structural(
            f"manifest covers {m.n_seq} sequences in {m.completed_chunks} chunks, "
            f"attributes say n_seq={n_seq}"
        )

    hooks = list(attrs["hooks"])
    ctx, d = int(attrs["ctx"]), int(attrs["d_model"])
    expected = {acts_name(h): ((ctx, d), attrs["store_dtype"]) for h in hooks}
    expected.update({TOKENS: ((ctx,), "int32"), "doc_id": ((), "int64"), "doc_offset": ((), "int64")})
    arrays = {}
    for name in array_names(hooks):
        try:
            arr = group[name]
        except KeyError:
            rep._structural(f"array {name} is missing")
            continue
        except Exception as e:  # a damaged zarr.json of the array: zarr raises various types
            rep._structural(f"array {name} has unreadable metadata ({type(e).__name__})")
            continue
        row, dtype = expected[name]
        if tuple(arr.shape[1:]) != row or str(arr.dtype) != dtype or (complete and arr.shape[0] != n_seq):
            rep._structural(
                f"array {name} has shape {arr.shape} {arr.dtype}, expected "
                f"({n_seq}, {', '.join(map(str, row))}) {dtype}"
            )
            continue
        if len(m.checksums.get(name, [])) != m.completed_chunks:
            rep._structural(
                f"manifest has {len(m.checksums.get(name, []))} checksums for {name}, "
                f"expected {m.completed_chunks}"
            )
            continue
        arrays[name] = arr

    vocab = (attrs.get("tokenizer") or {}).get("vocab_size")
    sums = {h: StatSums.zeros(d) for h in hooks}
    chunks = range(m.completed_chunks)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"verify {rep.key[:30]}", unit="chunk")
    for c in chunks:
        lo, hi = m.chunk_range(c, n_seq)
        where = f"chunk {c} (sequences {lo}-{hi - 1})"
        for name, arr in arrays.items():
            try:
                data = np.asarray(arr[lo:hi])
            except Exception as e:  # truncated or garbled chunk file: zarr's decoders raise various types
                rep._chunk(c, name, f"{where} of {name}: unreadable ({type(e).__name__}: {_first_line(e)})")
                continue
            rep.bytes_read += data.nbytes
            if checksum(data) != m.checksums[name][c]:
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))}"
                gone = not sync(store.exists(key))
                what = "chunk file missing" if gone else "checksum mismatch"
                rep._chunk(c, name, f"{where} of {name}: {what} ({key})")
            if name.startswith("acts/"):
                if not np.isfinite(data).all():
                    rep._chunk(c, name, f"{where} of {name}: holds NaN or Inf")
                else:
                    hook = name[len("acts/") :]
                    sums[hook] = sums[hook] + StatSums.of(data)
            elif name == TOKENS and vocab and (data.min() < 0 or data.max() >= vocab):
                rep._chunk(c, name, f"{where} of tokens: ids outside [0, {vocab})")
    rep.sums = sums
    if not rep.problems:
        stored = {h: s.stats() for h, s in m.sums.items()} if not complete else attrs.get("stats", {})
        for h in hooks:
            rep.problems.extend(_compare_stats(h, sums[h].stats(), stored.get(h)))
    rep.seconds = time.perf_counter() - t0
    return rep


def _compare_stats(hook: str, got: dict, want: dict | None, rtol: float = 1e-6) -> list[str]:
    if want is None:
        return [f"stats of {hook} are missing"]
    if got["count"] != want["count"]:
        return [f"stats of {hook}: count {want['count']} recorded, {got['count']} recomputed"]
    out = []
    scale = max(want["mean_norm"], 1e-12)
    if not np.allclose(got["mean"], want["mean"], rtol=rtol, atol=rtol * scale):
        out.append(f"stats of {hook}: recorded mean vector differs from the recomputed one")
    for k in ("mean_norm", "mean_sq_norm"):
        if not np.isclose(got[k], want[k], rtol=rtol):
            out.append(f"stats of {hook}: {k} {want[k]:.6g} recorded, {got[k]:.6g} recomputed")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
