"""Small helpers shared by the core, the nodes and the command line.

Nothing here imports jax at module import.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager

logger = logging.getLogger("wan_tpu")


class DeviceMemoryError(RuntimeError):
    """A Wan component did not fit in accelerator memory."""


_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|bytes)", re.IGNORECASE)


@contextmanager
def device_errors(component: str, advice: str):
    """Turn XLA's RESOURCE_EXHAUSTED into a message naming the component, the
    memory it asked for and what to lower."""
    try:
        yield
    except Exception as error:  # XlaRuntimeError/JaxRuntimeError have no stable import path
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
            raise
        sizes = _BYTES.findall(text)
        needed = f" (XLA asked for {sizes[0][0]} {sizes[0][1]})" if sizes else ""
        raise DeviceMemoryError(
            f"{component} ran out of device memory{needed}. {advice} "
            f"Or press 'Unload Models' to free what other models hold. XLA said: {text.splitlines()[0][:300]}"
        ) from error


def torch_to_numpy(tensor):
    """A CPU torch tensor as a numpy array, bfloat16 included (via ml_dtypes)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


class StageTimer:
    """Collects per-phase wall times: ``with timer("denoise"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def write_mp4(frames, path: str, fps: int = 16, quality: int = 8) -> str:
    """Write float frames [F, H, W, 3] in [0, 1] to an H.264 MP4 with imageio-ffmpeg."""
    import imageio_ffmpeg
    import numpy as np

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames of shape {frames.shape}: expected [frames, height, width, 3]")
    pixels = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    height, width = pixels.shape[1:3]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        path, (width, height), fps=fps, quality=quality, macro_block_size=1, pix_fmt_out="yuv420p",
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in pixels:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    logger.info("wrote %d frames (%dx%d, %d fps) to %s", len(pixels), width, height, fps, path)
    return path
