"""Read and write SAELens's on-disk layout (`cfg.json` + `sae_weights.safetensors`).

SAELens 6.x writes
    cfg.json: {"architecture": "standard" | "topk" | "jumprelu" | ..., "d_in", "d_sae", "dtype", "device",
               "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
               "metadata": {"sae_lens_version", "model_name", "hook_name", ...},
               "k", "rescale_acts_by_decoder_norm" (topk only)}
    weights:  W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] (+ threshold [d_sae])
Pre-6 configs keep the metadata at the top level, call the hook "hook_point", and store a TopK SAE
as architecture "standard" with activation_fn_str "topk" and activation_fn_kwargs {"k": ...}.

`load_saelens` maps "standard" -> ReluL1SAE and "topk" -> TopKSAE *exactly*, folding SAELens options
into the weights: apply_b_dec_to_input=False  =>  b_enc += b_dec @ W_enc (our encoder subtracts b_dec);
rescale_acts_by_decoder_norm  =>  W_enc[:, i] *= n_i, b_enc[i] *= n_i, W_dec[i] /= n_i, n_i = ||W_dec[i]||.
Anything else (JumpReLU, gated, runtime normalisation, hook_z reshaping) is refused with one line.

`save_saelens` writes a folder a current SAELens loads with `SAE.load_from_disk`: ReLU-L1 as
"standard", TopK as "topk", and any model offering `saelens_export()` (T-SAE: "jumprelu").
Our own `save` uses the same weight names, plus firing statistics and our cfg fields.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tsae.models.base import CONFIG_FILE, SAE, WEIGHTS_FILE
from tsae.models.relu_l1 import ReluL1Config, ReluL1SAE
from tsae.models.static import StaticSAE
from tsae.models.topk import TopKConfig, TopKSAE

SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write (metadata nested, SAELens >= 6)
_PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


def looks_like_saelens(cfg: dict[str, Any]) -> bool:
    """True for a cfg.json written by SAELens rather than by tsae."""
    return "metadata" in cfg or "apply_b_dec_to_input" in cfg or "hook_point" in cfg


def _metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    meta = {**{k: v for k, v in cfg.items() if k != "metadata"}, **cfg.get("metadata", {})}
    hook = meta.get("hook_name") or meta.get("hook_point") or ""
    layer = meta.get("hook_layer")
    if layer is None:
        m = re.search(r"blocks\.(\d+)\.", hook)
        layer = int(m.group(1)) if m else -1
    return {"model_name": meta.get("model_name") or "", "hook_name": hook, "hook_layer": int(layer)}


def load_saelens(folder: str | Path, device: str | torch.device = "cpu") -> ReluL1SAE | TopKSAE:
    """Load a SAELens-format folder as an equivalent tsae static SAE."""
    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if arch == "standard" and act_fn == "topk":  # pre-6 TopK
        arch = "topk"
    elif arch == "standard" and act_fn not in ("relu", None):
        raise ValueError(f"{folder}: SAELens activation {act_fn!r} is not supported (relu or topk)")
    if arch not in ("standard", "topk"):
        raise ValueError(f"{folder}: SAELens architecture {arch!r} is not supported by tsae "
                         "(supported: standard, topk)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", False):
        raise ValueError(f"{folder}: normalize_activations={norm!r} is not supported; fold the "
                         "scaling into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{folder}: reshape_activations={cfg['reshape_activations']!r} is not supported")

    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in state and torch.allclose(state[name], torch.ones_like(state[name])):
            del state[name]
    if set(state) != set(_PARAMS):
        raise ValueError(f"{folder}: expected weights {list(_PARAMS)}, found {sorted(state)}")
    W_enc, W_dec, b_enc, b_dec = (state[k] for k in _PARAMS)
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        n = W_dec.norm(dim=-1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]

    unit = bool(torch.allclose(W_dec.norm(dim=-1), torch.ones(W_dec.shape[0]), atol=1e-3))
    common = dict(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], unit_norm_decoder=unit, **_metadata(cfg))
    if arch == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise ValueError(f"{folder}: TopK SAE without k in cfg.json")
        sae: StaticSAE = TopKSAE(TopKConfig(k=int(k), **common))
    else:
        extra = {"l1": float(cfg["l1_coefficient"])} if "l1_coefficient" in cfg else {}
        sae = ReluL1SAE(ReluL1Config(**common, **extra))
    with torch.no_grad():
        for name, value in zip(_PARAMS, (W_enc, W_dec, b_enc, b_dec), strict=True):
            getattr(sae, name).copy_(value)
    return sae.to(device).eval()


def save_saelens(sae: SAE, folder: str | Path) -> Path:
    """Write `sae` in SAELens's layout (only weights SAELens knows; no firing statistics)."""
    export = getattr(sae, "saelens_export", None)
    if export is None:
        raise ValueError(f"architecture {sae.architecture!r} has no SAELens equivalent "
                         "(static relu_l1, topk and t_sae only)")
    arch, extra_cfg, extra_state = export()
    state = {k: getattr(sae, k) for k in _PARAMS} | extra_state
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    cfg = {
        "architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "model_name": sae.cfg.model_name, "hook_name": sae.cfg.hook_name, "hook_head_index": None,
            "hook_layer": sae.cfg.hook_layer, "tsae_architecture": sae.architecture,
        },
        **extra_cfg,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return folder
