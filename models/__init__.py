"""Model families: what each one needs of the model-agnostic ``runtime`` and ``sampling`` machinery.

Imports neither torch nor jax.
"""
