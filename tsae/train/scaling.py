"""Input normalisation: train on s * x with s chosen so that E||s x|| = sqrt(d).

    s = sqrt(d) / E||x||

With this scaling, hyper-parameters (lr, L1 weight, ...) transfer across models and layers whose
residual norms differ by orders of magnitude.  The scale is folded into the saved weights
(`model.fold_input_scale(s)`), so a saved SAE acts on raw activations.

E||x|| comes from the store's statistics (`ActivationStore.stats(hook)["mean_norm"]`) when there
are any, else it is estimated on a sample of whole sequences (`WindowBatches.sample_sequences`).
"""

from __future__ import annotations

import math

import numpy as np


def input_scale(mean_norm: float, d: int) -> float:
    if not mean_norm > 0 or not math.isfinite(mean_norm):
        raise ValueError(f"mean activation norm must be positive and finite, got {mean_norm}")
    return math.sqrt(d) / mean_norm


def mean_norm(x: np.ndarray) -> float:
    """E||x|| over all positions of a sample [..., d]."""
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64), axis=-1).mean())
