"""Sparse autoencoders: static baselines, the temporal SAE, and temporal baselines from the literature."""
