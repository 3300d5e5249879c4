"""ComfyUI-Wan-TPU: Wan 2.1 and 2.2 and HunyuanVideo 1.5 video generation on Cloud TPU through torchax.

Registration only: importing the pack imports neither jax nor torchax and
changes no global state. Inside ComfyUI it also wraps "Unload Models" so that
it frees this pack's device memory, adds the ``/wan_tpu/devices`` route, and
serves ``web/`` (the TPU monitor panel) to the page.
"""

from . import hunyuan_nodes, nodes
from .env_manager import install_comfyui_unload_hook
from .server_routes import register_routes

NODE_CLASS_MAPPINGS = {**nodes.NODE_CLASS_MAPPINGS, **hunyuan_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**nodes.NODE_DISPLAY_NAME_MAPPINGS, **hunyuan_nodes.NODE_DISPLAY_NAME_MAPPINGS}

install_comfyui_unload_hook()
register_routes()

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
