"""`LoadedModel`: a TransformerLens 4 `TransformerBridge` plus what the cache records about it.

Hook names are TransformerLens names: the residual stream after block L is
`blocks.L.hook_resid_post`, which equals the HF model's `hidden_states[L + 1]`.  `run_to_hooks`
runs only the blocks up to the deepest requested hook.

torch and transformer_lens are imported inside methods, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ModelError

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
_EMBED_PREFIXES = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")


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

    @classmethod
    def from_bridge(
        cls, bridge, tokenizer, name: str, weights_hash: str, dtype: str, device: str
    ) -> LoadedModel:
        """Wrap a booted bridge; the sizes come from its config."""
        cfg = bridge.cfg
        return cls(
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
        return self._forward(tokens, "logits")

    def loss(self, tokens):
        """Mean next-token cross-entropy (nats/token) without gradients."""
        return self._forward(tokens, "loss")

    def _forward(self, tokens, return_type: str):
        import torch

        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.bridge(tokens, return_type=return_type)


def _capture(into: dict, name: str):
    """A forward hook that keeps its activation under `name` (as run_with_cache does: no copy)."""

    def hook(tensor, hook):
        into[name] = (tensor[0] if isinstance(tensor, tuple) else tensor).detach()

    return hook


def _stop_here(tensor, hook):
    """A forward hook that ends the bridge's forward here; the forward returns `tensor`."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(tensor[0] if isinstance(tensor, tuple) else tensor)
