"""The pack's routes on ComfyUI's server: ``GET /wan_tpu/devices`` for the page's TPU monitor.

Registered at import inside ComfyUI only (``PromptServer.instance`` exists). The
answer comes from ``TorchaxEnvManager.device_report``, which never starts jax:
asking before the pack has run anything says so instead of grabbing the TPU.
"""

from __future__ import annotations

import logging

from .env_manager import TorchaxEnvManager

logger = logging.getLogger("wan_tpu")

DEVICES_ROUTE = "/wan_tpu/devices"


def device_report() -> dict:
    return TorchaxEnvManager.instance().device_report()


def register_routes(prompt_server=None) -> bool:
    """Add the routes to ComfyUI's server once; False outside ComfyUI."""
    if prompt_server is None:
        try:
            from server import PromptServer  # ComfyUI's module; absent when the pack runs alone
        except ImportError:
            return False
        prompt_server = getattr(PromptServer, "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None or getattr(prompt_server, "_wan_tpu_routes", False):
        return routes is not None
    from aiohttp import web

    @routes.get(DEVICES_ROUTE)
    async def devices(request):
        return web.json_response(device_report())

    prompt_server._wan_tpu_routes = True
    return True
