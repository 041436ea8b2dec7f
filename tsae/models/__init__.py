"""Sparse autoencoders: static baselines, the temporal SAE, and temporal baselines from the literature.

Importing this package imports every model module so their `@register` decorators run.
"""

from tsae.models import crosscoder, relu_l1, t_sae, topk  # noqa: F401
from tsae.models.crosscoder import TemporalCrosscoder
from tsae.models.relu_l1 import ReluL1SAE
from tsae.models.t_sae import ContrastiveTemporalSAE
from tsae.models.topk import TopKSAE

__all__ = ["ContrastiveTemporalSAE", "ReluL1SAE", "TemporalCrosscoder", "TopKSAE"]
from tsae.models.tsae import TemporalSAE  # noqa: E402, F401  (engineer D: registers "tsae")
