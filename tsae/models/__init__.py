"""Sparse autoencoders: static baselines, the temporal SAE, and temporal baselines from the literature.

Importing this package imports every model module so their `@register` decorators run.
"""

from tsae.models import relu_l1, topk  # noqa: F401
from tsae.models.relu_l1 import ReluL1SAE
from tsae.models.topk import TopKSAE

__all__ = ["ReluL1SAE", "TopKSAE"]
