"""Reading an activation store (layout in `pipeline.store_layout`, writing in `pipeline.store_writer`).

    store = ActivationStore.open("smollm2-135m_L15_ctx128_3f9c0a1b2d4e", model="smollm2-135m",
                                 hook="blocks.15.hook_resid_post")
    acts, tokens = store.read([3, 17], store.hooks[0])        # float32 [2, ctx, d], int32 [2, ctx]
    for batch in store.iter_windows(store.hooks[0], window=16, batch_size=256, seed=0):
        ...  # WindowBatch(acts [B, 16, d], tokens [B, 16], seq [B], start [B])

`open` refuses, with a one-line `StoreError`, a store that is missing, still building (or interrupted),
built for another model, or lacking the requested hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.errors import StoreError
from pipeline.store_check import CheckedArray, ChunkChecks
from pipeline.store_layout import (
    DOC_ID,
    DOC_OFFSET,
    FORMAT_TAG,
    LOCK_FILE,
    MANIFEST_KEY,
    STATUS_COMPLETE,
    TOKENS,
    Manifest,
    StoreUnreachable,
    acts_name,
    array_specs,
    attrs_problem,
    join,
    manifest_problem,
    normalise,
    object_store_error,
    open_group,
    read_key,
    zarr_store,
)


def resolve(path_or_key: str | Path, cache_dir=None) -> str | Path:
    """A store location: ``path_or_key`` itself if it is a path/URL that exists or has a separator,
    else ``<cache home>/<key>``."""
    text = str(path_or_key)
    if "/" in text or "\\" in text or Path(text).exists():
        return normalise(text)
    return join(paths.cache_home(cache_dir), text)


def read_attrs(location) -> dict | None:
    """The root attributes of the store at ``location`` (parsed zarr.json, no zarr import); None if
    there is no store there.  Attributes that a reader, verify, resume or repair cannot use (a
    damaged zarr.json) raise `StoreError`."""
    location = normalise(location)
    try:
        if isinstance(location, Path):
            raw = (location / "zarr.json").read_bytes() if (location / "zarr.json").is_file() else None
        else:
            raw = read_key(zarr_store(location, read_only=True), "zarr.json")
    except (OSError, FileNotFoundError):
        return None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_TAG:
        return None
    problem = attrs_problem(attrs)
    if problem:
        raise StoreError(
            f"store at {location} is damaged: its attributes are unusable ({problem}); "
            "remove it (`tsae-cache rm`) and build it again"
        )
    return attrs


class ActivationStore:
    """A complete (by default) store opened read-only.  Arrays are zarr arrays, read lazily."""

    def __init__(self, location, group, attrs: dict, *, checked: bool = True):
        self.location, self.group, self.attrs = location, group, attrs
        self.key: str = attrs["key"]
        self.hooks: list[str] = list(attrs["hooks"])
        self.ctx: int = int(attrs["ctx"])
        self.d_model: int = int(attrs["d_model"])
        self.chunk_seqs: int = int(attrs["chunk_seqs"])
        self.complete = attrs.get("status") == STATUS_COMPLETE
        self._checks = self._chunk_checks() if checked else None
        self.n_seq: int = int(attrs["n_seq"]) if self.complete else self.manifest().n_seq
        self.tokens = self.array(TOKENS)
        self.doc_id = self.array(DOC_ID)
        self.doc_offset = self.array(DOC_OFFSET)

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path_or_key,
        cache_dir=None,
        *,
        model=None,
        hook: str | None = None,
        require_complete: bool = True,
        checked: bool = True,
    ) -> ActivationStore:
        """Open a store by key (under the cache home) or by path/URL.

        model: a spec string (``"smollm2-135m"``, a folder) or a `LoadedModel` (then its weights hash
            must match too); hook: a hook the caller needs.  Mismatches raise `StoreError`.
        checked: reads check each chunk's sha256 against the manifest the first time they touch it
            and refuse a damaged chunk with `StoreError` (`pipeline.store_check`); False reads raw.
        """

        location = resolve(path_or_key, cache_dir)
        attrs = read_attrs(location)
        if attrs is None:
            raise StoreError(f"no activation store at {location} (see `tsae-cache ls`)")
        if require_complete and attrs.get("status") != STATUS_COMPLETE:
            raise StoreError(
                f"store {attrs.get('key')} is incomplete (status {attrs.get('status')!r}); "
                "rerun its `tsae-cache build` command to finish it"
            )
        store = cls(location, open_group(zarr_store(location, read_only=True), "r"), attrs, checked=checked)
        store.check(model=model, hook=hook)
        return store

    def check(self, *, model=None, hook: str | None = None) -> None:
        """Raise `StoreError` unless this store was built from ``model`` and holds ``hook``."""
        if hook is not None and hook not in self.hooks:
            raise StoreError(f"store {self.key} holds {', '.join(self.hooks)}, not {hook}")
        if model is None:
            return
        m = self.attrs["model"]
        if isinstance(model, str):
            wanted = model.strip()
            names = {m["name"], m["spec"], str(m.get("identity", {}).get("spec"))}
            if Path(wanted).expanduser().is_dir():
                wanted = str(Path(wanted).expanduser().resolve())
            if wanted not in names and wanted.lower() not in names:
                raise StoreError(f"store {self.key} was built from {m['name']}, not {model}")
        else:
            if model.weights_hash and model.weights_hash != m["weights_hash"]:
                raise StoreError(
                    f"store {self.key} was built from {m['name']} weights "
                    f"{m['weights_hash'][:12]}, not {model.name} weights {model.weights_hash[:12]}"
                )

    def manifest(self) -> Manifest:
        raw = read_key(self.group.store, MANIFEST_KEY)
        if raw is None:
            raise StoreError(f"store {self.key} has no manifest.json")
        return Manifest.from_bytes(raw)

    def _chunk_checks(self) -> ChunkChecks:
        """The manifest's digests, after checking that they cover every chunk the attributes claim."""
        m = self.manifest()
        problem = manifest_problem(m, self.hooks, self.d_model, self.chunk_seqs)
        if problem:
            raise StoreError(f"store {self.key}: manifest.json does not fit the store ({problem}); damaged")
        if self.complete and m.n_seq != int(self.attrs["n_seq"]):
            raise StoreError(
                f"store {self.key}: manifest.json covers {m.n_seq} sequences, the attributes "
                f"{self.attrs['n_seq']}; the store is damaged (run `tsae-cache verify {self.key}`)"
            )
        names = [acts_name(h) for h in self.hooks] + [TOKENS, DOC_ID, DOC_OFFSET]
        if any(len(m.checksums.get(name, ())) != m.completed_chunks for name in names):
            raise StoreError(f"store {self.key}: manifest.json lacks checksums; the store is damaged")
        return ChunkChecks(self.key, m)

    # ------------------------------------------------------------------------------------ reading
    def array(self, name: str):
        """One array of the store (``acts/<hook>``, ``tokens``, ``doc_id``, ``doc_offset``): a
        `CheckedArray` (reads verified chunk-wise against the manifest) unless opened unchecked."""
        try:
            raw = self.group[name]
        except KeyError:
            raise StoreError(f"store {self.key} has no array {name}; the store is damaged") from None
        except Exception as e:  # a damaged zarr.json of the array: zarr raises various types
            raise StoreError(f"store {self.key}: array {name} is unreadable ({type(e).__name__})") from None
        row, dtype = array_specs(self.hooks, self.ctx, self.d_model, self.attrs["store_dtype"])[name]
        if tuple(raw.shape[1:]) != row or raw.shape[0] < self.n_seq or str(raw.dtype) != dtype:
            raise StoreError(
                f"store {self.key}: array {name} is {raw.shape} {raw.dtype}, not ({self.n_seq}, "
                f"{', '.join(map(str, row))}) {dtype}; the store is damaged"
            )
        return raw if self._checks is None else CheckedArray(raw, name, self._checks)

    def activations(self, hook: str):
        """The array ``[n_seq, ctx, d]`` of one hook (stored dtype), reads checked (see `array`)."""
        self.check(hook=hook)
        return self.array(acts_name(hook))

    @property
    def n_tokens(self) -> int:
        return self.n_seq * self.ctx

    def read(self, seq_indices, hook: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole sequences: float32 ``[n, ctx, d]`` and int32 tokens ``[n, ctx]``, in the order asked."""
        idx = np.asarray(seq_indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_seq):
            raise IndexError(f"sequence index out of range [0, {self.n_seq})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        arr = self.activations(hook)
        if len(uniq) and uniq[-1] - uniq[0] + 1 == len(uniq):  # one contiguous range: a slice read
            a, t = arr[uniq[0] : uniq[-1] + 1], self.tokens[uniq[0] : uniq[-1] + 1]
        else:
            a, t = arr.get_orthogonal_selection((uniq,)), self.tokens.get_orthogonal_selection((uniq,))
        return np.asarray(a, dtype=np.float32)[inverse], np.asarray(t)[inverse]

    def window(self, seq: int, t: int, w: int, hook: str) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``[t, t + w)`` of sequence ``seq``: float32 ``[w, d]`` and int32 ``[w]``."""
        if not (0 <= seq < self.n_seq and 0 <= t and w >= 1 and t + w <= self.ctx):
            raise IndexError(f"window seq={seq} t={t} w={w} outside [0, {self.n_seq}) x [0, {self.ctx})")
        a = self.activations(hook)[seq, t : t + w]
        return np.asarray(a, dtype=np.float32), np.asarray(self.tokens[seq, t : t + w])

    def iter_windows(
        self,
        hook: str,
        window: int,
        batch_size: int,
        seed: int = 0,
        *,
        seq_indices=None,
        with_tokens: bool = True,
        **kwargs,
    ):
        """`tsae.data.windows.WindowBatches` over this store: chunks and sequences shuffled, never
        positions; extra keyword arguments (epochs, n_tokens, prefetch, device, ...) pass through."""
        from tsae.data.windows import WindowBatches

        return WindowBatches(
            self.activations(hook),
            self.tokens if with_tokens else None,
            window=window,
            batch_size=batch_size,
            seed=seed,
            seq_indices=seq_indices,
            chunk_seqs=self.chunk_seqs,
            **kwargs,
        )

    def stats(self, hook: str) -> dict:
        """``{"mean": float64 [d], "mean_norm", "mean_sq_norm", "count"}`` over every stored token."""
        self.check(hook=hook)
        s = dict(self.attrs["stats"][hook])
        s["mean"] = np.asarray(s["mean"], dtype=np.float64)
        return s

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) sequence indices with whole documents on one side (no document leaks).

        Documents are ordered by a seeded permutation and assigned to val until it holds at least
        ``val_fraction`` of the sequences; both sides keep ascending order (chunk-friendly reads).
        """
        if not 0 < val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        doc = np.asarray(self.doc_id[: self.n_seq])
        docs, counts = np.unique(doc, return_counts=True)
        order = np.random.default_rng(seed).permutation(len(docs))
        take = np.searchsorted(np.cumsum(counts[order]), val_fraction * len(doc)) + 1
        val_docs = docs[order[: min(take, max(len(docs) - 1, 1))]]
        is_val = np.isin(doc, val_docs)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.key}: {self.n_seq} seq x {self.ctx} pos, hooks {self.hooks}, "
            f"{'complete' if self.complete else 'incomplete'})"
        )


# ------------------------------------------------------------------------------ the cache directory
def list_stores(cache_dir=None) -> list[dict]:
    """Every store directly under the cache home: ``{"key", "location", "attrs", "status", "n_seq",
    "bytes"}``; a damaged one is listed with status ``damaged`` and empty attrs."""
    home = paths.cache_home(cache_dir)
    out = []
    for location in _children(home):
        try:
            attrs = read_attrs(location)
            if attrs is None:
                if not looks_like_store(location):
                    continue
                raise StoreError("zarr.json is unreadable")
            n_seq = attrs.get("n_seq")
            if attrs["status"] != STATUS_COMPLETE:
                raw = read_key(zarr_store(location, read_only=True), MANIFEST_KEY)
                n_seq = Manifest.from_bytes(raw).n_seq if raw else 0
            key, status = attrs["key"], attrs["status"]
        except StoreError:
            attrs, n_seq, status = {}, None, "damaged"
            key = str(location).rstrip("/").rpartition("/")[2]
        out.append(
            {
                "key": key,
                "location": location,
                "attrs": attrs,
                "status": status,
                "n_seq": n_seq,
                "bytes": _size(location),
            }
        )
    return sorted(out, key=lambda s: s["key"])


def looks_like_store(location) -> bool:
    """True if ``location`` holds a store's own files (a manifest or a build lock), readable or not."""
    if isinstance(location, Path):
        return (location / MANIFEST_KEY).is_file() or (location / LOCK_FILE).is_file()
    return read_key(zarr_store(location, read_only=True), MANIFEST_KEY) is not None


def resolve_key(key, cache_dir=None, verb: str = "open") -> str | Path:
    """The location of a store named on the command line: a key, or a path to a store directly
    under the cache home.  Anything that would reach outside the cache home is refused with a
    `StoreError`: ``..``, ``../x``, ``a/b``, absolute paths elsewhere, a symlink pointing out, NUL."""
    home = paths.cache_home(cache_dir)
    text = str(key)
    refused = StoreError(
        f"refusing to {verb} {text[:200]!r}: it is not a store directly under the cache dir {home}"
    )
    if not text.strip() or "\x00" in text or text.rstrip("/\\").rpartition("/")[2] in ("", ".", ".."):
        raise refused
    plain = not any(sep in text for sep in "/\\")
    location = join(home, text) if plain else normalise(text)
    if isinstance(location, Path):
        inside = location.resolve().parent == Path(home).resolve()
    else:
        inside = str(location).rstrip("/").rpartition("/")[0] == home.rstrip("/")
    if not inside:
        raise refused
    return location


def remove(path_or_key, cache_dir=None) -> str | Path:
    """Delete a store that lives directly under the cache home; refuses anything else."""
    location = resolve_key(path_or_key, cache_dir, "remove")
    try:
        found = read_attrs(location) is not None or looks_like_store(location)
    except StoreUnreachable:
        raise
    except StoreError:  # a damaged store can be removed
        found = True
    if not found:
        raise StoreError(f"no activation store at {location}")
    if isinstance(location, Path):
        import shutil

        from pipeline.store_lock import lock_builder, unlock

        unlock(lock_builder(location))  # refuses while a build holds the lock
        shutil.rmtree(location)
    else:
        import fsspec.core

        from pipeline.store_lock import lock_builder, unlock

        lock = lock_builder(location)  # on S3 a lease: refuses while a build holds it
        try:
            fs, path = fsspec.core.url_to_fs(str(location))
            if lock is None:
                fs.rm(path, recursive=True)
            else:  # the lease goes last, so no builder starts on a half-removed store
                fs.invalidate_cache(path)
                fs.rm([f for f in fs.find(path) if not f.endswith(f"/{LOCK_FILE}")])
        finally:
            unlock(lock)
    return location


def _children(home: str) -> list:
    if paths.is_url(home):
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(home)
        proto = home.split("://", 1)[0]
        try:
            return [
                f"{proto}://{p.lstrip('/')}" if proto != "memory" else f"memory://{p}"
                for p in fs.ls(path, detail=False)
            ]
        except FileNotFoundError:
            return []
        except Exception as e:
            raise (object_store_error(e, home) or e) from None
    root = Path(home)
    if root.exists() and not root.is_dir():
        raise StoreError(f"cache dir {root} is a file, not a directory")
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _size(location) -> int:
    if isinstance(location, Path):
        return sum(p.stat().st_size for p in location.rglob("*") if p.is_file())
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(str(location))
    return int(fs.du(path))
