"""What a store must still be after a fault: a snapshot of a store, the differences from a reference,
and the refusals a consumer must meet at damaged chunks (and only there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import ActivationStore
from pipeline.store_layout import array_names
from pipeline.verify import verify_store

# the reliability suite's build: tiny model, layer 1, 96 sequences of 32 tokens in 12 chunks of 8
TINY = dict(model="tiny", ctx=32, max_tokens=32 * 96, chunk_seqs=8, batch_size=4, progress=False)


def snapshot(location: Path) -> dict:
    """Everything a store holds that must survive faults: arrays, stats, manifest checksums."""
    store = ActivationStore.open(location, checked=False)
    return {
        "arrays": {name: np.asarray(store.group[name][:]) for name in array_names(store.hooks)},
        "stats": store.attrs["stats"],
        "checksums": store.manifest().checksums,
    }


def differences(reference: dict, location: Path) -> list[str]:
    """Why the store at ``location`` is not the reference (empty when it is)."""
    try:
        rep = verify_store(location)
        got = snapshot(location)
    except StoreError as e:
        return [f"store unusable: {e}"]
    out = [f"verify: {p}" for p in rep.problems]
    for name, want in reference["arrays"].items():
        if got["arrays"][name].shape != want.shape or not np.array_equal(got["arrays"][name], want):
            out.append(f"{name} differs from the reference")
    if got["stats"] != reference["stats"]:
        out.append("stats differ from the reference")
    if got["checksums"] != reference["checksums"]:
        out.append("manifest checksums differ from the reference")
    return out


def wrong_seqs(reference: dict, location: Path) -> int:
    try:
        got = snapshot(location)["arrays"]
    except StoreError:
        return len(reference["arrays"]["tokens"])
    bad = np.zeros(len(reference["arrays"]["tokens"]), dtype=bool)
    for name, want in reference["arrays"].items():
        have = got[name]
        if have.shape != want.shape:
            return len(bad)
        bad |= (have != want).reshape(len(bad), -1).any(axis=1)
    return int(bad.sum())


def chunk_file(location: Path, name: str, c: int) -> Path:
    ndim = len(json.loads((location / name / "zarr.json").read_text())["shape"])
    return location / name / "c" / "/".join(map(str, (c,) + (0,) * (ndim - 1)))


def refusals(location: Path, damage: dict) -> list[str]:
    """A consumer must get StoreError for every damaged chunk and data for every intact one."""
    out = []
    store = ActivationStore.open(location)
    damaged = {c for c, _ in damage}
    for c in range(-(-store.n_seq // store.chunk_seqs)):
        lo = c * store.chunk_seqs
        for name in array_names(store.hooks):
            try:
                store.array(name)[lo]  # one sequence: the whole chunk is checked on first touch
                ok = True
            except StoreError:
                ok = False
            if ok == ((c, name) in damage):
                out.append(f"reading chunk {c} of {name}: {'no error' if ok else 'refused'}")
    if damaged:
        try:
            list(store.iter_windows(store.hooks[0], window=8, batch_size=64, seed=0))
            if any(n.startswith("acts/") or n == "tokens" for _, n in damage):
                out.append("iter_windows over a damaged store raised nothing")
        except StoreError:
            pass
    return out
