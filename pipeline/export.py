"""Export a complete store to one HDF5 file (h5py), for tools that do not read zarr.

The file mirrors the store: datasets ``acts/<hook>``, ``tokens``, ``doc_id``, ``doc_offset`` with the
same shapes and dtypes (contiguous layout: the fastest h5py layout here for both writing and random
reads), and the root attributes.  HDF5 attributes cannot hold nested dicts, so each attribute that is
not a plain scalar or string is stored as a JSON string, and ``tsae_attrs_json`` holds all of them;
`read_hdf5_attrs` gives back the original dict.  Data are copied chunk by chunk (bounded memory); the
file is written under a temporary name and renamed, so a failed export leaves no partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError, UserError
from pipeline.store import ActivationStore
from pipeline.store_layout import array_names

ATTRS_JSON = "tsae_attrs_json"


def export_hdf5(
    path_or_key, out: str | Path, cache_dir=None, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Write the complete store ``path_or_key`` to ``out`` (.h5); returns the output path."""
    import h5py

    store = ActivationStore.open(path_or_key, cache_dir)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            for k, v in store.attrs.items():
                f.attrs[k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
            f.attrs[ATTRS_JSON] = json.dumps(store.attrs)
            _copy_arrays(store, f, progress)
        os.replace(tmp, out)
    except OSError as e:
        raise StoreError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _copy_arrays(store: ActivationStore, f, progress: bool) -> None:
    c = store.chunk_seqs
    names = array_names(store.hooks)
    steps = [(name, lo) for name in names for lo in range(0, store.n_seq, c)]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="export", unit="chunk")
    src = {name: store.array(name) for name in names}  # checked reads: a damaged chunk is refused
    dsets = {name: f.create_dataset(name, shape=a.shape, dtype=a.dtype) for name, a in src.items()}
    for name, lo in steps:
        hi = min(lo + c, store.n_seq)
        dsets[name][lo:hi] = np.asarray(src[name][lo:hi])


def read_hdf5_attrs(path: str | Path) -> dict:
    """The store attributes saved in an exported file."""
    import h5py

    with h5py.File(path, "r") as f:
        return json.loads(f.attrs[ATTRS_JSON])
