"""The Wan families (2.1 and 2.2): latent formats, family classes and their rules.

Imports neither torch nor jax.
"""
