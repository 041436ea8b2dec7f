"""`tsae-cache repair`: recompute only the damaged chunks of a store, restoring it bit for bit.

    report = repair_store("tiny_L1_ctx32_edba8e822b1b")      # or `tsae-cache repair KEY`

Protocol:

1. Take the store's build lock (a build or another repair of the same store is refused meanwhile).
2. `verify_store` finds the damaged chunks of every array (checksum mismatch, unreadable or missing
   chunk file, NaN/Inf, token ids outside the vocabulary).  Damage no chunk rewrite can fix (a missing
   manifest or array, wrong shapes) is refused: remove the store and build it again.
3. The build's sequence stream is regenerated from the stored recipe (model spec, dataset, split,
   ctx, BOS, max_tokens; the source's content fingerprint must still match) and cut into the same
   chunks.  Tokenising is cheap; only the damaged chunks' sequences go through the model, in the
   store's own batches (the manifest's batch size), so the results are the build's results.
4. A regenerated chunk's tokens, doc ids and offsets must match the manifest's digests before
   anything of it is written (else the source or tokenizer changed: refused).  Its damaged chunk
   files are deleted and rewritten.  Activations whose digest equals the manifest's are restored bit
   for bit; if they differ (another device or thread count changed the last bits) the new digest
   replaces the recorded one and the report says so.
5. Statistics are recomputed from the stored data (the same float64 chunk-order sums the writer
   keeps) and replace the manifest's sums and the ``stats`` attribute if they changed; a final
   `verify_store` must pass.  A repair killed half-way leaves damage that the next repair finds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.cache_runner import remove_partial_writes
from pipeline.errors import StoreError
from pipeline.store import read_attrs, resolve
from pipeline.store_layout import (
    DOC_ID,
    DOC_OFFSET,
    MANIFEST_KEY,
    STATUS_COMPLETE,
    TOKENS,
    Manifest,
    acts_name,
    checksum,
    open_group,
    read_key,
    write_key,
    zarr_store,
)
from pipeline.store_writer import _utcnow
from pipeline.verify import VerifyReport, verify_store


@dataclass
class RepairReport:
    key: str
    location: str
    chunks: dict[int, list[str]] = field(default_factory=dict)  # chunk -> arrays rewritten
    exact: int = 0  # rewritten arrays whose bytes equal what the build wrote
    changed: list[str] = field(default_factory=list)  # "chunk c of NAME" whose digest had to change
    stats_updated: bool = False
    forward_tokens: int = 0  # tokens run through the model
    seconds: float = 0.0


def repair_store(path_or_key, cache_dir=None, *, model=None, device: str = "auto") -> RepairReport:
    """Repair the store in place (see module); ``model`` may be a preloaded `LoadedModel`."""
    from pipeline.store_lock import lock_builder, unlock

    t0 = time.perf_counter()
    location = resolve(path_or_key, cache_dir)
    if read_attrs(location) is None:
        raise StoreError(f"no activation store at {location}")
    lock = lock_builder(location)
    try:
        report = _repair(location, cache_dir, model, device)
    finally:
        unlock(lock)
    report.seconds = time.perf_counter() - t0
    return report


def _repair(location, cache_dir, model, device: str) -> RepairReport:

    before = verify_store(location)
    attrs = read_attrs(location)
    rep = RepairReport(before.key, str(location))
    if before.structural:
        raise StoreError(
            f"cannot repair {rep.key}: {before.structural[0]}; remove it (`tsae-cache rm {rep.key}`) "
            "and build it again"
        )
    store = zarr_store(location, read_only=False)
    group = open_group(store, "r+")
    manifest = Manifest.from_bytes(read_key(store, MANIFEST_KEY))
    if before.damaged:
        model = model if model is not None else _load(attrs, cache_dir, device)
        _check_recipe(attrs, model)
        for c, tokens, doc_id, doc_offset in _regenerate(attrs, model, manifest, sorted(before.damaged)):
            _rewrite(rep, group, manifest, model, attrs, c, before.damaged[c], tokens, doc_id, doc_offset)
        write_key(store, MANIFEST_KEY, manifest.to_bytes())
    after = verify_store(location)
    if _stats_differ(after) and not (after.damaged or after.structural):
        _update_stats(store, group, manifest, attrs, after)
        rep.stats_updated = True
        after = verify_store(location)
    if not _only_incomplete(after):
        raise StoreError(f"repair of {rep.key} left problems: {after.problems[0]}")
    if attrs.get("status") == STATUS_COMPLETE:  # no share worker can be writing into a complete store
        remove_partial_writes(location)
    if rep.chunks or rep.stats_updated:
        group.attrs.update({"repaired_at": [*attrs.get("repaired_at", []), _utcnow()]})
    return rep


def _load(attrs: dict, cache_dir, device: str):
    from pipeline.models import load_model

    return load_model(attrs["model"]["spec"], dtype=attrs["dtype"], device=device, cache_home=cache_dir)


def _check_recipe(attrs: dict, model) -> None:
    from pipeline.sources import source_fingerprint

    want = attrs["model"].get("weights_hash")
    if want and model.weights_hash and model.weights_hash != want:
        raise StoreError(
            f"cannot repair {attrs['key']}: it was built from weights {want[:12]}, "
            f"the model loaded now has {model.weights_hash[:12]}"
        )
    d = attrs["dataset"]
    now = source_fingerprint(d["dataset"], d["split"], d["text_column"], d["config"])
    if now != d["fingerprint"]:
        raise StoreError(
            f"cannot repair {attrs['key']}: dataset {d['dataset']!r} changed since the build "
            "(content fingerprint differs); remove the store and build it again"
        )


def _regenerate(attrs: dict, model, m: Manifest, wanted: list[int]):
    """(chunk, tokens, doc_id, doc_offset) of each wanted chunk, from the build's own sequence stream."""
    from pipeline.cache_chunks import chunk_stream, source_sequences
    from pipeline.cache_plan import CacheConfig

    d = attrs["dataset"]
    source = {k: d[k] for k in ("dataset", "split", "text_column", "config")}
    ctx, bos = int(attrs["ctx"]), bool(attrs["prepend_bos"])
    recipe = CacheConfig(**source, ctx=ctx, prepend_bos=bos, max_tokens=attrs["max_tokens"])
    seqs = source_sequences(recipe, model.tokenizer)
    todo = set(wanted)
    for c, tokens, doc_id, doc_offset in chunk_stream(seqs, m.chunk_seqs, ctx):
        if c in todo:
            todo.discard(c)
            yield c, tokens, doc_id, doc_offset
        if not todo:
            return
    raise StoreError(
        f"cannot repair {attrs['key']}: the dataset now yields fewer chunks than the store holds"
    )


def _rewrite(rep, group, m: Manifest, model, attrs, c: int, names: set[str], tokens, doc_id, doc_offset):
    from pipeline.cache_chunks import forward_chunk

    lo, hi = m.chunk_range(c)
    got = {TOKENS: tokens, DOC_ID: doc_id, DOC_OFFSET: doc_offset}
    for name, data in got.items():
        if len(data) != hi - lo or checksum(data) != m.checksums[name][c]:
            raise StoreError(
                f"cannot repair {attrs['key']}: chunk {c} regenerated from the source differs from the "
                f"build's {name} (the source or the tokenizer changed); remove the store and build it again"
            )
    hooks = [h for h in attrs["hooks"] if acts_name(h) in names]
    if hooks:
        acts = forward_chunk(model, tokens, hooks, m.batch_size, attrs["store_dtype"])
        got.update({acts_name(h): a for h, a in acts.items()})
        rep.forward_tokens += tokens.size
    for name in sorted(names):
        arr = group[name]
        _delete_chunk(group.store, arr, c)
        arr[lo:hi] = got[name]
        digest = checksum(got[name])
        if digest == m.checksums[name][c]:
            rep.exact += 1
        else:
            m.checksums[name][c] = digest
            rep.changed.append(f"chunk {c} of {name}")
    rep.chunks[c] = sorted(names)


def _delete_chunk(store, arr, c: int) -> None:
    """Remove chunk c's file, so the rewrite never has to decode what is left of it."""
    from zarr.core.sync import sync

    key = f"{arr.path}/{arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))}"
    sync(store.delete(key))


def _stats_differ(rep: VerifyReport) -> bool:
    return any(p.startswith("stats of ") for p in rep.problems)


def _only_incomplete(rep: VerifyReport) -> bool:
    return all(p.startswith("store is incomplete") for p in rep.problems)


def _update_stats(store, group, m: Manifest, attrs: dict, after: VerifyReport) -> None:
    """The recomputed sums become the manifest's; a complete store's ``stats`` attribute follows."""
    m.sums = dict(after.sums)
    write_key(store, MANIFEST_KEY, m.to_bytes())
    if attrs.get("status") == STATUS_COMPLETE:
        group.attrs.update({"stats": {h: s.stats() for h, s in m.sums.items()}})
