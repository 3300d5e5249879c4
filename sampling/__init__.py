"""Sampling: the one jitted denoising step (``StepProgram``), the loop that runs it (``DenoiseRun``), and
the chunked VAE programs. Model-agnostic: what differs between families comes from their family class.

Importing this package imports neither jax nor torch.
"""
