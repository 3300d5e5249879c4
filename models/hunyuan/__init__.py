"""HunyuanVideo 1.5 (text- and image-to-video) on the model-agnostic core: its family hooks
(``family``), its static-shape transformer forward (``transformer``), DeepCache (``deepcache``), its
components (``components``) and its stages (``pipeline.HunyuanVideoPipeline``).

Imports nothing heavy.
"""
