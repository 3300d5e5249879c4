"""The VAE's decode and encode as small compiled programs, one latent frame (or 4-frame chunk) per call,
the causal convolutions' cache carried between calls on the device and every chunk split over space.

Imports torch, diffusers and jax inside its functions only.
"""

from __future__ import annotations

import numpy as np

from .. import sharding
from ..runtime.compiled import compiled_program, shape_key
from ..runtime.placement import to_host
from ..runtime.torch_bridge import method_as_forward
from ..utils import device_errors


class VAEChunkDecoder:
    """The VAE decode, one latent frame (4 video frames) per call of a small compiled program.

    The same arithmetic as diffusers' ``AutoencoderKLWan._decode``: each latent
    frame goes through the decoder with the causal convolutions' feature cache
    of the frames before it. Here the cache is carried between calls as jax
    arrays, so one compiled program serves every frame of a kind: the first
    (an empty cache), the second (some entries still "Rep", diffusers' marker)
    and all later ones; three programs for any frame count.

    Traced as one program instead, XLA overlapped the 21 frames of an 81-frame
    video: 47 GiB of temporaries per device at 848x480 (v6e-8 holds 32), and a
    compile that had not finished after 30 minutes on 2 cores. A chunk needs
    one frame's working set and compiles in a fraction of the time.
    """

    part = "decoder"  # which half of the VAE; its causal convolutions' count sizes the cache
    output_height_dim = 1  # frames [f, H, W, 3]

    def __init__(self, manager, module, mesh=None):
        self.manager, self.module, self.mesh = manager, module, mesh
        self.patch_size = module.config.get("patch_size")  # Wan 2.2's VAE folds 2x2 pixels into channels
        self.spatial_factor = int(module.config.get("scale_factor_spatial", 8))
        self.conv_count = module._cached_conv_counts[self.part]
        self.jitted = manager.jax.jit(self._chunk, static_argnums=(3,))
        self.markers_after: dict[tuple, tuple] = {}  # cache markers in -> out, recorded when a chunk is traced
        self.compiled: dict = {}

    @property
    def first_markers(self) -> tuple:
        return (None,) * self.conv_count

    def _run(self, x, feat: list, first: bool):
        """One chunk through the torch module (traced by torchax): the decoder's clamped output."""
        import torch

        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.module
        x = vae.post_quant_conv(x)  # a 1x1x1 convolution: per frame it is what diffusers does at once
        out = vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=first)
        if self.patch_size is not None:  # per frame, so per chunk is what diffusers does at the end
            out = unpatchify(out, patch_size=self.patch_size)
        return torch.clamp(out, -1.0, 1.0)

    def _finish(self, out):
        """The chunk's output as returned to the host: frames [f, H, W, 3] float32 in [0, 1]."""
        jnp = self.manager.jax.numpy
        frames = jnp.clip(out[0].astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)  # [3, f, H, W]
        return jnp.transpose(frames, (1, 2, 3, 0))

    # -- split over space: every device decodes a strip of each frame (see sharding.spatial_split)
    def latent_hw(self, shape) -> tuple[int, int]:
        """The latent height and width of a chunk input of ``shape``."""
        return shape[-2], shape[-1]

    def split_axes(self, shape) -> tuple:
        if self.mesh is None:
            return None, None
        h_axes, w_axes, _ = sharding.spatial_split(dict(self.mesh.shape), *self.latent_hw(shape))
        return h_axes, w_axes

    def spatial_sharding(self, shape, axes, height_dim: int):
        """A NamedSharding splitting dims ``height_dim`` and ``height_dim + 1`` of ``shape`` over ``axes``
        where they divide (else that dim whole)."""
        from jax.sharding import NamedSharding, PartitionSpec

        sizes = dict(self.mesh.shape)
        spec = [None] * len(shape)
        for offset, dim_axes in enumerate(axes):
            dim = height_dim + offset
            if dim_axes is not None and shape[dim] % sharding.axis_size(dim_axes, sizes) == 0:
                spec[dim] = dim_axes
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def input_sharding(self, shape):
        return self.spatial_sharding(shape, self.split_axes(shape), len(shape) - 2)

    def _chunk(self, weights, x, cache, markers):
        """One chunk x -> (its output, new cache arrays).

        ``markers`` (static) says per cache entry: None (empty), "Rep" or "T" (an array, in ``cache`` order).
        The output and the cache stay split over space like the input, so no device ever holds a whole
        full-resolution feature map.
        """
        import torch

        env = self.manager.env
        with torch.inference_mode(False), torch.no_grad():
            torch_weights = env.j2t_iso({f"module.{name}": value for name, value in weights.items()})
            arrays = iter(env.j2t_iso(list(cache)))
            feat = [None if m is None else ("Rep" if m == "Rep" else next(arrays)) for m in markers]
            first = all(m is None for m in markers)
            wrapper = method_as_forward(self.module, lambda _, x: self._run(x, feat, first))
            with env:
                out = torch.func.functional_call(wrapper, torch_weights, (env.j2t_iso(x),), tie_weights=False)
            self.markers_after[markers] = tuple(
                None if f is None else ("Rep" if isinstance(f, str) else "T") for f in feat)
            out = env.t2j_iso(out)
            new_cache = [env.t2j_iso(f) for f in feat if f is not None and not isinstance(f, str)]
        out = self._finish(out)
        if self.mesh is not None:
            constrain = self.manager.jax.lax.with_sharding_constraint
            axes = self.split_axes(x.shape)
            out = constrain(out, self.spatial_sharding(out.shape, axes, self.output_height_dim))
            new_cache = [constrain(c, self.spatial_sharding(c.shape, axes, c.ndim - 2)) for c in new_cache]
        return out, new_cache

    def chunk_shapes(self, shape) -> list[tuple]:
        """The input shapes of the first chunks of a decode of latents ``shape``, up to the steady one."""
        batch, channels, frames, height, width = shape
        return [(batch, channels, 1, height, width)] * min(frames, 3)

    def chunk_kinds(self, weights, shape) -> list[tuple[tuple, tuple]]:
        """(markers, abstract args) of each program a run over ``shape`` runs, first to steady:
        what the compile-for-TPU command compiles. Traced abstractly (nothing runs)."""
        jax = self.manager.jax
        kinds, markers, cache = [], self.first_markers, []
        for chunk_shape in self.chunk_shapes(shape):
            x = jax.ShapeDtypeStruct(chunk_shape, jax.numpy.float32, sharding=self.input_sharding(chunk_shape))
            kinds.append((markers, (weights, x, list(cache))))
            _, cache = jax.eval_shape(lambda w, xx, c, m=markers: self._chunk(w, xx, c, m), weights, x, list(cache))
            axes = self.split_axes(chunk_shape)
            cache = [jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=self.spatial_sharding(c.shape, axes, c.ndim - 2))
                     for c in cache]
            markers = self.markers_after[markers]
        return kinds

    def run_chunks(self, weights, chunks, on_status, device, what: str, fix: str) -> list[np.ndarray]:
        """Each host chunk through its compiled program, the cache carried on the device; host outputs."""
        jax = self.manager.jax
        markers, cache, outputs = self.first_markers, [], []
        for chunk in chunks:
            x = jax.device_put(np.ascontiguousarray(chunk), self.input_sharding(chunk.shape))
            args = (weights, x, cache)
            key = (markers, shape_key(args[1:]))
            if key not in self.compiled:
                with device_errors(f"compiling {what}", "Lower the resolution."):
                    self.compiled[key] = compiled_program({}, key, self.jitted, args + (markers,), on_status, what,
                                                          fix, device=device)
            with device_errors(what, "Lower the resolution or num_frames."):
                out, cache = self.compiled[key](*args)
            markers = self.markers_after[markers]
            outputs.append(to_host(out))
        return outputs

    def decode(self, weights, latents, on_status=None, device=None) -> np.ndarray:
        """Frames [F, H, W, 3] float32 (host) of latents [1, z, T, h, w] (host)."""
        chunks = (latents[:, :, index:index + 1] for index in range(latents.shape[2]))
        return np.concatenate(self.run_chunks(weights, chunks, on_status, device, "the VAE decode",
                                              "Lower the resolution, or use a size the devices split evenly."))


class VAEChunkEncoder(VAEChunkDecoder):
    """The VAE encode (image-to-video's first frame), as diffusers' ``AutoencoderKLWan._encode`` runs it:
    the first frame alone, then 4 frames per chunk, the causal cache carried between chunks; one small
    compiled program per kind of chunk. Returns the latent distribution's mode (its mean), as diffusers'
    I2V pipeline takes it (``sample_mode="argmax"``)."""

    part = "encoder"
    output_height_dim = 3  # latent means [1, z, 1, h, w]

    def latent_hw(self, shape) -> tuple[int, int]:
        return shape[-2] // self.spatial_factor, shape[-1] // self.spatial_factor

    def _run(self, x, feat: list, first: bool):
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        vae = self.module
        if self.patch_size is not None:  # per frame, so per chunk is what diffusers does first
            x = patchify(x, patch_size=self.patch_size)
        encoded = vae.quant_conv(vae.encoder(x, feat_cache=feat, feat_idx=[0]))  # quant_conv is 1x1x1: per chunk
        return encoded[:, : vae.config.z_dim]

    def _finish(self, out):
        return out.astype(self.manager.jax.numpy.float32)

    def chunk_shapes(self, shape) -> list[tuple]:
        """The first chunks of an encode of a video ``shape`` [1, 3, F, H, W]: one frame, then 4 at a time."""
        batch, channels, frames, height, width = shape
        return ([(batch, channels, 1, height, width)]
                + [(batch, channels, 4, height, width)] * min((frames - 1) // 4, 2))

    def encode(self, weights, video, on_status=None, device=None) -> np.ndarray:
        """Latent means [1, z, T, h, w] (host) of a video [1, 3, F, H, W] in [-1, 1] (host), F = 4n+1."""
        frames = video.shape[2]
        chunks = [video[:, :, :1]] + [video[:, :, 1 + 4 * i:5 + 4 * i] for i in range((frames - 1) // 4)]
        return np.concatenate(self.run_chunks(weights, chunks, on_status, device, "the VAE encode",
                                              "Lower the resolution, or use a size the devices split evenly."), axis=2)
