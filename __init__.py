"""ComfyUI-Wan-TPU: Wan 2.1 text-to-video on Cloud TPU through torchax.

Registration only: importing the pack imports neither jax nor torchax and
changes no global state. Inside ComfyUI it also wraps "Unload Models" so that
it frees this pack's device memory.
"""

from .env_manager import install_comfyui_unload_hook
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

install_comfyui_unload_hook()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
