"""Per-latent firing statistics, kept as buffers so checkpoints carry them.

`tokens_since_fired[i]` counts the tokens seen since latent i last fired (counted at batch
granularity: a latent that fires anywhere in a batch is reset to 0).  A latent is *dead* over a
window of N tokens when it has not fired in the last N tokens.  `fire_count` and `tokens_seen`
give firing frequencies.  Used by TopK's auxiliary-k loss and by lifecycle/revival schemes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def firing_counts(codes: Tensor) -> tuple[Tensor, int]:
    """(int32 [d_sae] number of tokens on which each latent is active (> 0), number of tokens) of
    codes [..., d_sae] or their bool activity mask.  Mean L0 is counts.sum() / tokens.  (Counted
    in int32: a bool sum would first widen [tokens, d_sae] to int64.)"""
    active = codes.detach().reshape(-1, codes.shape[-1])
    active = active if active.dtype == torch.bool else active > 0
    return active.sum(0, dtype=torch.int32), active.shape[0]


class FiringTracker(nn.Module):
    def __init__(self, d_sae: int):
        super().__init__()
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("fire_count", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, codes: Tensor) -> None:
        """Record one batch of codes [..., d_sae] (active means > 0)."""
        self.record(*firing_counts(codes))

    @torch.no_grad()
    def record(self, fired: Tensor, n_tokens: int) -> None:
        """Record one batch given its firing_counts."""
        self.fire_count += fired
        self.tokens_seen += n_tokens
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired > 0] = 0

    def dead_mask(self, window_tokens: int) -> Tensor:
        """Bool [d_sae]: latents that have not fired in the last `window_tokens` tokens."""
        return self.tokens_since_fired >= window_tokens

    def frequency(self) -> Tensor:
        """Float [d_sae]: fraction of all seen tokens on which each latent fired."""
        return self.fire_count.double() / self.tokens_seen.clamp(min=1)

    @torch.no_grad()
    def reset(self, latents: Tensor | None = None) -> None:
        """Forget the history of `latents` (bool mask or indices; all if None), e.g. after revival."""
        if latents is None:
            self.tokens_since_fired.zero_()
            self.fire_count.zero_()
            self.tokens_seen.zero_()
        else:
            self.tokens_since_fired[latents] = 0
            self.fire_count[latents] = 0
