"""The contract every sparse autoencoder in tsae honours.

Every SAE, static or temporal, maps a batch of *sequences* of activations to codes and back:

    encode: x      [B, T, d_in]  -> f     [B, T, d_sae]   (non-negative, sparse)
    decode: f      [B, T, d_sae] -> x_hat [B, T, d_in]
    forward(x) = SAEOutput(x_hat=decode(encode(x)), codes=encode(x), aux={...})

Both maps are *causal* in T: position t depends only on positions <= t, so an SAE can be
spliced into a running model.  A static SAE treats every position independently.
`decode` is a function of codes alone, so an edited code (ablated, clamped, patched) can be
decoded; that is what the causal-intervention evaluation relies on.

Training is generic: a trainer calls `set_coeffs(coeffs)` (state a model holds per step, e.g. the
TSAE's gate opening and annealed k), then `forward`, then `loss_terms(x, out, coeffs)` which returns a
dict of named scalar tensors including the total under "loss"; `coeffs` carries the scheduled
coefficients of the step (sparsity, auxiliary, gate warm-up, ...).  A distilling trainer may put a
frozen teacher's outputs into `out.aux["teacher_codes"]` / `out.aux["teacher_x_hat"]` before
`loss_terms`.  `after_step` re-imposes constraints such as unit-norm decoder rows.

Saving follows SAELens's layout: a folder with `cfg.json` (the config dataclass plus
"architecture") and `sae_weights.safetensors`.  `tsae.models.registry.load_sae(folder)`
dispatches on "architecture".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass
class SAEConfig:
    """Fields shared by every SAE config.  Subclasses add their own."""

    d_in: int
    d_sae: int
    # Metadata a reader needs to splice the SAE back into its model (SAELens field names).
    model_name: str = ""
    hook_name: str = ""
    hook_layer: int = -1
    seed: int = 0


@dataclass
class SAEOutput:
    x_hat: Tensor  # [B, T, d_in]
    codes: Tensor  # [B, T, d_sae], non-negative
    aux: dict[str, Tensor] = field(default_factory=dict)  # model-specific tensors used by loss_terms


class SAE(nn.Module):
    """Base class.  Subclasses set `architecture`, `config_class`, and implement encode/decode/loss_terms."""

    architecture: ClassVar[str] = "base"
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    is_temporal: ClassVar[bool] = False
    # bumped when a change to the maps means weights trained before no longer fit (cached SAEs retrain)
    format_version: ClassVar[int] = 1

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg

    # ---- the interface -------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> SAEOutput:
        codes = self.encode(x)
        return SAEOutput(x_hat=self.decode(codes), codes=codes)

    def loss_terms(self, x: Tensor, out: SAEOutput, coeffs: dict[str, float]) -> dict[str, Tensor]:
        raise NotImplementedError

    def set_coeffs(self, coeffs: dict[str, float]) -> None:
        """Take this step's scheduled coefficients before `forward` (default: nothing to hold)."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-impose constraints after an optimiser step (default: nothing)."""

    @property
    def dictionary(self) -> Tensor:
        """The static decoder directions [d_sae, d_in] (used for dictionary-recovery metrics)."""
        raise NotImplementedError

    # ---- persistence ---------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **dataclasses.asdict(self.cfg)}

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True))
        return folder

    @classmethod
    def from_config_dict(cls, d: dict[str, Any]) -> SAE:
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        cfg = cls.config_class(**{k: v for k, v in d.items() if k in names})
        return cls(cfg)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> SAE:
        from safetensors.torch import load_file

        folder = Path(folder)
        d = json.loads((folder / CONFIG_FILE).read_text())
        model = cls.from_config_dict(d)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(device)))
        # Eval mode: some SAEs (BatchTopK) are only causal per token at inference.
        return model.to(device).eval()
