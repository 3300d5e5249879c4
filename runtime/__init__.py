"""Model-agnostic device machinery: the environment, chips, the torch bridge, shardings and layouts,
attention dispatch, the component cache and path confinement. Nothing here knows a model family.

Importing this package imports neither jax nor torch (each module imports them inside its functions).
"""
