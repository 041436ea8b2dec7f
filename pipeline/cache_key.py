"""The cache key: a stable name for everything that changes a store's contents, computed without weights.

    key = <model slug>_L<layers>_ctx<ctx>_<hash12>      e.g. smollm2-135m_L15_ctx128_3f9c0a1b2d4e

``hash12`` is the first 12 hex digits of sha256 over the canonical JSON of `key_fields`:

- the model's *identity*: its spec plus a fingerprint of its weights that costs no model load
  (see `model_identity`);
- the hooks, ctx, BOS handling, compute dtype and stored dtype;
- the dataset spec, split, text column, config and the source's content fingerprint;
- ``max_tokens`` and the store format version.

Left out, because they do not change what is stored: batch size, chunk layout, progress display,
cache location, and the device.  CPU and CUDA kernels differ in the last bits of float32 results
(relative ~1e-6), far below float16 storage rounding (~5e-4), so a store built on either machine
serves both; the device that built it is recorded in the root attributes.  A bfloat16 or float16
*compute* dtype does change results and is part of the key.

Because the key needs no weights, a repeated request is answered before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.store_layout import FORMAT_VERSION

EMBEDDED_N_LAYERS = {"smollm2-135m": 30}  # block_count of the shipped GGUF (reading it costs ~4 s)
_SLUG = re.compile(r"[^a-z0-9.-]+")


def _file_sha256(path: Path, memo_dir: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) in ``memo_dir`` (best effort)."""
    st = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = memo_dir / f"{tag}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    value = digest.hexdigest()
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(value + "\n")
    except OSError:
        pass
    return value


def model_identity(spec: str, cache_dir=None) -> dict | None:
    """What identifies the weights (and tokenizer) of ``spec`` without loading it; None if unknowable.

    - ``smollm2-135m``: sha256 of the shipped GGUF file (memoised; ~0.1 s the first time);
    - ``tiny[:k=v,...]``: its full settings (seeded random init) plus the tokenizer's GGUF hash;
    - a local folder: A's memoised weight-file hash plus the sha256 of config.json and tokenizer.json;
    - a hub name: the commit of its cached snapshot, or None when not cached (then the runner loads
      the model first and asks again, since the download caches it).
    """
    from pipeline import embedded, models, paths

    models_dir = paths.models_dir(cache_dir)
    memo = models_dir / "weight-hashes"
    text = str(spec).strip()
    low = text.lower()
    if low == "smollm2-135m":
        return {"spec": low, "gguf_sha256": _file_sha256(embedded.gguf_path(), memo)}
    if low == "tiny" or low.startswith("tiny:"):
        settings = {**models.TINY_DEFAULTS, **models.parse_tiny_overrides(text)}
        return {
            "spec": "tiny",
            "settings": settings,
            "tokenizer_gguf_sha256": _file_sha256(embedded.gguf_path(), memo),
        }
    folder = Path(text).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        extra = {
            p: _file_sha256(folder / p, memo)
            for p in ("config.json", "tokenizer.json")
            if (folder / p).is_file()
        }
        return {
            "spec": str(folder),
            "weights_sha256": models.folder_weights_hash(folder, models_dir),
            **extra,
        }
    snapshot = models.cached_snapshot(text)
    return None if snapshot is None else {"spec": text, "snapshot": snapshot.name}


def cheap_n_layers(spec: str) -> int | None:
    """The model's layer count without loading it, where that is cheap; None otherwise."""
    from pipeline import models

    low = str(spec).strip().lower()
    if low in EMBEDDED_N_LAYERS:
        return EMBEDDED_N_LAYERS[low]
    if low == "tiny" or low.startswith("tiny:"):
        n = {**models.TINY_DEFAULTS, **models.parse_tiny_overrides(str(spec))}["n_layers"]
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None  # bad: the loader says
    config = Path(str(spec)).expanduser() / "config.json"
    try:
        cfg = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):  # unreadable: loading the folder reports it in one line
        return None
    for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(cfg, dict) and isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def default_layers(n_layers: int) -> list[int]:
    """One middle layer: ``n_layers // 2`` (15 of SmolLM2's 30)."""
    return [n_layers // 2]


def key_fields(
    *,
    model: dict,
    hooks: list[str],
    ctx: int,
    prepend_bos: bool,
    dtype: str,
    store_dtype: str,
    dataset: dict,
    max_tokens: int | None,
    tokenization: dict,
) -> dict:
    """The canonical dict hashed into the key (also stored verbatim as the root attribute ``key_fields``)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "hooks": list(hooks),
        "ctx": int(ctx),
        "prepend_bos": bool(prepend_bos),
        "dtype": dtype,
        "store_dtype": store_dtype,
        "dataset": dataset,
        "max_tokens": max_tokens,
        "tokenization": tokenization,
    }


def digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layer_tag(hooks: list[str]) -> str:
    """``L6`` / ``L3-6-9`` for residual hooks, else a slug of the hook names."""
    layers = [m.group(1) for h in hooks if (m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", h))]
    if len(layers) == len(hooks):
        return "L" + "-".join(layers)
    return (
        "H"
        + "-".join(_SLUG.sub("", h.lower().replace("blocks.", "").replace("hook_", "")) for h in hooks)[:40]
    )


def make_key(fields: dict) -> str:
    """The readable store name: ``<model>_<layers>_ctx<ctx>_<hash12>``."""
    spec = fields["model"]["spec"]
    name = Path(spec).name if "/" in spec else spec
    slug = _SLUG.sub("-", name.lower()).strip("-")[:40] or "model"
    return f"{slug}_{layer_tag(fields['hooks'])}_ctx{fields['ctx']}_{digest(fields)[:12]}"
