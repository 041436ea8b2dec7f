"""Dictionary recovery: how well learned decoder directions match a planted dictionary.

For true unit directions D [n_feat, d] and learned decoder rows W [d_sae, d]:

    mmcs_i   = max_j cos(D_i, W_j)                  per true feature (max cosine similarity)
    recovery = mean_i mmcs_i                          (over all true features, or a group)
    recovered_frac(tau) = mean_i [mmcs_i > tau]

Cosines ignore row norms, so a model with its input scale folded in (rows of norm 1/s) scores
the same as before folding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _unit(w: Tensor) -> Tensor:
    w = torch.as_tensor(w, dtype=torch.float64)
    return w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def max_cosines(true_dict, learned) -> Tensor:
    """mmcs [n_feat]: each true feature's best cosine with any learned row."""
    return (_unit(true_dict) @ _unit(learned).T).max(dim=1).values


def recovery(true_dict, learned, groups: dict[str, np.ndarray | Tensor] | None = None,
             tau: float = 0.9) -> dict[str, float]:
    """{"mmcs": mean max cosine, "recovered_frac": share above tau, "mmcs/<group>": ...}.

    groups: name -> bool mask [n_feat] (e.g. {"persistent": data.persistent}); each gets its own
    mean max cosine and recovered fraction.
    """
    m = max_cosines(true_dict, learned)
    out = {"mmcs": float(m.mean()), "recovered_frac": float((m > tau).double().mean())}
    for name, mask in (groups or {}).items():
        mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        if mask.any():
            out[f"mmcs/{name}"] = float(m[mask].mean())
            out[f"recovered_frac/{name}"] = float((m[mask] > tau).double().mean())
    return out
