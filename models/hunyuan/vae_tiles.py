"""HunyuanVideo 1.5's VAE decode in spatial tiles, as diffusers computes it after ``vae.enable_tiling()``
(what diffusers' own HunyuanVideo 1.5 examples do), with the tiles decoded on the mesh.

Why tiles: the decoder runs every frame of the clip at once (its mid-block attends over all of them),
so at 1280x720 and 121 frames one of its full-resolution activations alone is 121 x 720 x 1280 x 128
channels in fp32, 57 GB: more than any chip holds. A 256x256 tile (diffusers' default) is 1/14 of that.

How: ``AutoencoderKLHunyuanVideo15.tiled_decode`` cuts the latents into overlapping tiles, decodes
each, and blends the overlaps. Here the tiles are decoded first, one per device and call (tiles of one
shape stacked on the batch, split over every device), and then diffusers' own ``tiled_decode`` runs on
the host with a decoder that hands back those results in its order, so the cutting and blending are
diffusers' code, not a copy of it.

Imports torch and jax inside its functions only.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np

from ...runtime.placement import to_host

logger = logging.getLogger("wan_tpu")

TILE_PIXELS = 256  # diffusers' tile_sample_min_height / _width
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor
# The tile decode's compiled peak per device at 121 frames (benchmarks/hunyuan_compile.py --stage decode):
# 256 px 18.8 GiB on v6e; on v5e (16 GiB) 256 px needs 30.3 and 192 px 18.6, 128 px holds 10.2.
SMALL_HBM_TILE_PIXELS, SMALL_HBM_BYTES = 128, 24 * 2**30


def default_tile_pixels(hbm_bytes: int | None) -> int:
    """diffusers' 256-pixel tile, or 128 on chips with less than 24 GiB of HBM (v5e)."""
    return SMALL_HBM_TILE_PIXELS if hbm_bytes is not None and hbm_bytes < SMALL_HBM_BYTES else TILE_PIXELS


def tile_windows(latent_height: int, latent_width: int, latent_tile: int, overlap: float = TILE_OVERLAP
                 ) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of each latent tile, in the order ``tiled_decode`` decodes them."""
    stride = int(latent_tile * (1 - overlap))
    return [(top, left, min(latent_tile, latent_height - top), min(latent_tile, latent_width - left))
            for top in range(0, latent_height, stride) for left in range(0, latent_width, stride)]


def needs_tiles(latent_height: int, latent_width: int, latent_tile: int) -> bool:
    """diffusers tiles only a video larger than one tile (``_decode``'s test)."""
    return latent_width > latent_tile or latent_height > latent_tile


def frame_causal_mask(n_frame: int, n_hw: int, dtype, device, batch_size: int | None = None):
    """The VAE attention's mask, as ``HunyuanVideo15AttnBlock.prepare_causal_attention_mask`` makes it (0 where
    a token may attend: every token of its own and earlier frames; -inf elsewhere), in one vectorised op.
    diffusers' fills it row by row: traced, that is one update per token, 7,936 of them for a 256-pixel tile
    of 121 frames, and libtpu's compiler overflowed its stack on them."""
    import torch

    frame = torch.arange(n_frame * n_hw, device=device) // n_hw
    mask = torch.zeros((n_frame * n_hw, n_frame * n_hw), dtype=dtype, device=device)
    mask = mask.masked_fill(frame[None, :] > frame[:, None], float("-inf"))
    return mask if batch_size is None else mask.unsqueeze(0).expand(batch_size, -1, -1)


def install_frame_causal_mask(vae) -> int:
    """Give each attention block of the VAE (encoder and decoder) ``frame_causal_mask``; returns how many."""
    blocks = [m for m in vae.modules() if hasattr(m, "prepare_causal_attention_mask")]
    for block in blocks:
        block.prepare_causal_attention_mask = frame_causal_mask
    return len(blocks)


class _Replay:
    """Stands in for the VAE's decoder inside ``tiled_decode``: returns the tiles decoded on the device,
    in the order it asks for them, checking each is the tile it asked for."""

    def __init__(self, decoded: list, shapes: list):
        self.decoded, self.shapes, self.next = decoded, shapes, 0

    def __call__(self, tile):
        expected = self.shapes[self.next]
        if tuple(tile.shape[-2:]) != expected:
            raise RuntimeError(f"tiled decode asked for a {tuple(tile.shape[-2:])} tile, {expected} was decoded")
        out = self.decoded[self.next]
        self.next += 1
        return out


class TiledVAEDecoder:
    """The tiled decode of one VAE component (``models.hunyuan.components.Component``). ``tile_pixels``:
    the tile's side in pixels (diffusers' ``tile_sample_min_height`` and ``_width``)."""

    def __init__(self, manager, module, mesh, spatial_factor: int, tile_pixels: int = TILE_PIXELS):
        if tile_pixels % spatial_factor or tile_pixels < 2 * spatial_factor:
            raise ValueError(f"tile_pixels={tile_pixels}: use a multiple of the VAE's {spatial_factor}-pixel "
                             f"latent cell, at least {2 * spatial_factor} (256 is diffusers' default)")
        self.manager, self.module, self.mesh = manager, module, mesh
        self.tile_pixels, self.latent_tile = tile_pixels, tile_pixels // spatial_factor
        self.programs: dict = {}

    @property
    def slots(self) -> int:
        """Tiles decoded per call: one per device."""
        return self.mesh.devices.size

    def tile_sharding(self):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names)))

    def jitted(self):
        """decoder(weights, z [slots, C, T, h, w]) -> [slots, 3, F, H, W], one tile per device."""
        from ...runtime.torch_bridge import call_torch_module

        jax = self.manager.jax

        def decode_tiles(weights, z):
            # One tile at a time per device (vmap): the decoder's mid-block attention builds its mask for a
            # batch of one (it broadcasts a [B, S, S] mask against [B, 1, S, C] queries).
            def one(tile):
                return call_torch_module(self.manager, self.module, weights, lambda module, x: module.decoder(x),
                                         (tile[None],))[0]
            return jax.vmap(one)(z)

        if "decoder" not in self.programs:
            self.programs["decoder"] = jax.jit(decode_tiles, out_shardings=self.tile_sharding())
        return self.programs["decoder"]

    def decode(self, weights, latents: np.ndarray, on_status: Callable[[str], None] | None = None) -> np.ndarray:
        """Videos [B, 3, F, H, W] float32 (host) from latents [B, C, T, h, w] (host), each tiled."""
        return np.concatenate([self._decode_one(weights, item[None], on_status) for item in latents])

    def _decode_one(self, weights, latents: np.ndarray, on_status) -> np.ndarray:
        import torch

        from ...utils import device_errors

        jax = self.manager.jax
        windows = tile_windows(latents.shape[-2], latents.shape[-1], self.latent_tile)
        decoded: list = [None] * len(windows)
        by_shape: dict = {}
        for index, (_, _, height, width) in enumerate(windows):
            by_shape.setdefault((height, width), []).append(index)
        calls = sum(-(-len(group) // self.slots) for group in by_shape.values())
        done = 0
        for shape, group in by_shape.items():
            for first in range(0, len(group), self.slots):
                batch = group[first:first + self.slots]
                tiles = [latents[0, :, :, top:top + h, left:left + w] for top, left, h, w in
                         (windows[index] for index in batch)]
                tiles += [tiles[-1]] * (self.slots - len(tiles))  # idle devices repeat the last tile
                done += 1
                if on_status is not None:
                    on_status(f"decoding the video: tiles {first + 1}-{first + len(batch)} of {len(group)} at "
                              f"{shape[1] * self.tile_pixels // self.latent_tile}x"
                              f"{shape[0] * self.tile_pixels // self.latent_tile} (call {done} of {calls})")
                with device_errors("the VAE decoder", "Lower the resolution or num_frames, or the tile "
                                   "(HunyuanVideoPipeline.vae_tile_pixels, e.g. 128)."):
                    out = to_host(self.jitted()(weights, jax.device_put(np.ascontiguousarray(np.stack(tiles)),
                                                                        self.tile_sharding())))
                for slot, index in enumerate(batch):
                    decoded[index] = torch.from_numpy(np.array(out[slot:slot + 1]))
        return self._blend(torch.from_numpy(latents), decoded, [w[2:] for w in windows])

    def _blend(self, latents, decoded: list, shapes: list) -> np.ndarray:
        """diffusers' ``tiled_decode`` on the host over the decoded tiles: its cutting and blending."""
        view = copy.copy(self.module)  # its own __dict__ and module table; the shared module is untouched
        view._modules = dict(self.module._modules)
        replay = _Replay(decoded, shapes)
        object.__setattr__(view, "decoder", replay)
        view._modules.pop("decoder", None)
        view.tile_sample_min_height = view.tile_sample_min_width = self.tile_pixels
        view.tile_latent_min_height = view.tile_latent_min_width = self.latent_tile
        view.tile_overlap_factor = TILE_OVERLAP
        import torch

        with torch.no_grad():
            video = type(self.module).tiled_decode(view, latents.float())
        if replay.next != len(decoded):
            raise RuntimeError(f"tiled decode used {replay.next} of {len(decoded)} decoded tiles")
        return video.numpy()
