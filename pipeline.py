"""The ComfyUI-free core: Wan 2.1 text-to-video on torchax over a (dp, tp) mesh.

Three stages, each usable alone (the ComfyUI nodes call them one by one):

- ``encode(prompt, negative_prompt)`` -> ``WanEmbeddings`` (CPU tensors);
- ``denoise(embeddings, ...)`` -> VAE latents [1, 16, T, H/8, W/8] (CPU), in
  the VAE's own space: the convention of ComfyUI's LATENT and of ``decode``;
- ``decode(latents)`` -> frames [F, H, W, 3] float32 in [0, 1] (CPU).

The diffusers modules run unchanged: their weights become sharded jax arrays,
and each stage is one ``jax.jit`` of a pure function that calls the torch
module through torchax. Components are loaded, sharded and compiled once and
cached by ``TorchaxEnvManager``; prompts, seeds, guidance, step counts and
flow_shift are traced values, so changing them compiles nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import families, loading, memory_plan, sharding
from .env_manager import TorchaxEnvManager
from .magcache import MagCacheSettings, RatioSource, ratios_for, run_schedule, save_calibration
from .scheduler import UniPCFlowSchedule, make_schedule, unipc_update
from .utils import StageTimer, device_errors, torch_to_numpy

logger = logging.getLogger("wan_tpu")

VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class WanImageConditioning:
    """An image-to-video model's conditioning on its first frame, made by ``encode_image``.

    ``condition``: [1, 20, T, h, w] float32 (CPU): the first-frame mask (4
    channels) and the normalised VAE latents of the image followed by black
    frames (16), which the transformer takes beside the noisy latents.
    ``image_embeds``: Wan 2.1 I2V's CLIP tokens [1, n, clip_dim] (CPU), else None.
    The video size it was made for is kept, so a sampler of another size is told.
    """

    condition: Any
    image_embeds: Any
    model_id: str
    height: int
    width: int
    num_frames: int


@dataclass(frozen=True)
class WanEmbeddings:
    """UMT5 embeddings of a prompt pair: [1, 512, text_dim] float32 CPU tensors.

    Padding positions are zero, as diffusers' ``encode_prompt`` leaves them.
    """

    prompt_embeds: Any
    negative_prompt_embeds: Any
    model_id: str

    @property
    def text_dim(self) -> int:
        return int(self.prompt_embeds.shape[-1])


def check_video_shape(height: int, width: int, num_frames: int, spatial_factor: int = VAE_SPATIAL_FACTOR) -> None:
    """Raise ValueError unless Wan can make a video of this size (``spatial_factor``: the VAE's, 8 for Wan 2.1's
    VAE, 16 for Wan 2.2's; the transformer patches 2x2 on top)."""
    multiple = 2 * spatial_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
            raise ValueError(
                f"{name}={value}: this model needs a multiple of {multiple} (the VAE downsamples {spatial_factor}x "
                f"and the transformer patches 2x2), e.g. "
                f"{max(multiple, int(value) // multiple * multiple) if isinstance(value, (int, np.integer)) else 480}"
            )
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_FACTOR:
        lower = max(1, (int(num_frames) - 1) // 4 * 4 + 1) if isinstance(num_frames, (int, np.integer)) else 81
        raise ValueError(f"num_frames={num_frames}: Wan needs 4n+1 frames ({lower} or {lower + 4})")


def latent_shape(height: int, width: int, num_frames: int, channels: int = LATENT_CHANNELS,
                 spatial_factor: int = VAE_SPATIAL_FACTOR) -> tuple[int, int, int, int, int]:
    """The VAE latents of a video: Wan 2.1's VAE by default; Wan 2.2's has 48 channels and ``spatial_factor`` 16."""
    return (
        1,
        channels,
        (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1,
        height // spatial_factor,
        width // spatial_factor,
    )


@dataclass(frozen=True)
class VAEGeometry:
    """Latent channels and downsampling of a model's VAE, from vae/config.json (nothing loaded)."""

    channels: int = LATENT_CHANNELS
    spatial_factor: int = VAE_SPATIAL_FACTOR

    @classmethod
    def from_config(cls, config: dict) -> "VAEGeometry":
        if config.get("scale_factor_temporal", VAE_TEMPORAL_FACTOR) != VAE_TEMPORAL_FACTOR:
            raise ValueError(f"VAE scale_factor_temporal={config['scale_factor_temporal']}: Wan's VAEs compress "
                             f"time 4x; this is not a Wan VAE")
        return cls(int(config.get("z_dim", LATENT_CHANNELS)), int(config.get("scale_factor_spatial",
                                                                             VAE_SPATIAL_FACTOR)))

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        return latent_shape(height, width, num_frames, self.channels, self.spatial_factor)


# ------------------------------------------------------------------ torchax glue
def _method_as_forward(module, method):
    """A wrapper whose ``forward`` is ``module.<method>`` (or ``method(module, ...)`` for a
    function), so ``torch.func.functional_call`` (which only calls ``forward``) can bind
    weights for any method, e.g. the VAE's ``decode``."""
    import torch

    wrapper = torch.nn.Module()
    wrapper.module = module
    if callable(method):
        wrapper.forward = lambda *args, **kwargs: method(module, *args, **kwargs)
    else:
        wrapper.forward = lambda *args, **kwargs: getattr(module, method)(*args, **kwargs)
    return wrapper


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

    def __init__(self, manager: TorchaxEnvManager, module, mesh=None):
        self.manager, self.module, self.mesh = manager, module, mesh
        self.patch_size = module.config.get("patch_size")  # Wan 2.2's VAE folds 2x2 pixels into channels
        self.spatial_factor = int(module.config.get("scale_factor_spatial", VAE_SPATIAL_FACTOR))
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
            if dim_axes is not None and shape[dim] % sharding._axis_size(dim_axes, sizes) == 0:
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
            wrapper = _method_as_forward(self.module, lambda _, x: self._run(x, feat, first))
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
            key = (markers, _shape_key(args[1:]))
            if key not in self.compiled:
                with device_errors(f"compiling {what}", "Lower the resolution."):
                    self.compiled[key] = compiled_program({}, key, self.jitted, args + (markers,), on_status, what,
                                                          fix, device=device)
            with device_errors(what, "Lower the resolution or num_frames."):
                out, cache = self.compiled[key](*args)
            markers = self.markers_after[markers]
            outputs.append(np.asarray(out))
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


def call_torch_module(manager: TorchaxEnvManager, module, weights: dict, method: str | Callable, args: tuple,
                      kwargs: dict | None = None, pick: Callable = lambda out: out):
    """Run ``module.<method>(*args, **kwargs)`` (or ``method(module, *args, **kwargs)``) with
    ``weights`` (jax arrays) on jax arrays ``args``.

    Usable inside ``jax.jit``. ``pick`` selects the tensor(s) to return from
    the module's output while it is still a torch object.
    """
    import torch

    env = manager.env
    # ComfyUI runs nodes under torch.inference_mode. Torchax tensors made there
    # are inference tensors, for which composite ops (conv3d, dropout) reach
    # torchax undecomposed and have no lowering; so wrap and trace outside it.
    with torch.inference_mode(False), torch.no_grad():
        torch_weights = env.j2t_iso({f"module.{name}": value for name, value in weights.items()})
        torch_args = env.j2t_iso(args)
        kwargs = env.j2t_iso(dict(kwargs or {}))  # jax arrays among the keyword arguments too
        with env:
            # Every name of a tied weight is in ``weights`` (place_weights), so no tying is needed;
            # transformers 4.x would otherwise refuse a value for each name.
            output = torch.func.functional_call(
                _method_as_forward(module, method), torch_weights, torch_args, kwargs, tie_weights=False
            )
            output = pick(output)
        return env.t2j_iso(output)


@contextlib.contextmanager
def _block_cache(module, record: bool, reuse):
    """MagCache around the transformer blocks, while the transformer is traced.

    ``record``: capture the blocks' residual (output of the last block minus
    input of the first), as diffusers' MagCache hooks do. ``reuse`` (a torch
    tensor): the blocks do no work; their output is their input plus it.
    Yields a dict that holds "residual" after a recording forward.
    """
    blocks, captured, handles = module.blocks, {}, []
    if record:
        def keep_input(block, args, kwargs):
            captured["input"] = args[0] if args else kwargs["hidden_states"]

        def keep_residual(block, args, kwargs, output):
            captured["residual"] = output - captured["input"]

        handles.append(blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(keep_residual, with_kwargs=True))
    if reuse is not None:
        for index, block in enumerate(blocks):  # an instance attribute shadows the class's forward
            block.forward = (lambda hidden_states, *_, **__: hidden_states + reuse) if index == 0 else (
                lambda hidden_states, *_, **__: hidden_states)
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        if reuse is not None:
            for block in blocks:
                del block.forward


@contextlib.contextmanager
def _split_tokens(manager: TorchaxEnvManager, module, mesh, split: "sharding.TokenSplit | None"):
    """The sequence layout: every block's input [B, S, D] is constrained to ``split`` (tokens over the
    devices), so XLA keeps the blocks' work split by token and gathers weights rather than activations.
    Nothing when ``split`` is None (the tensor layout)."""
    if split is None:
        yield
        return
    from jax.sharding import NamedSharding, PartitionSpec

    tokens = NamedSharding(mesh, PartitionSpec(*split.spec()))
    env, constrain = manager.env, manager.jax.lax.with_sharding_constraint

    def constrain_input(block, args, kwargs):
        if args:
            return (env.j2t_iso(constrain(env.t2j_iso(args[0]), tokens)),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=env.j2t_iso(constrain(env.t2j_iso(kwargs["hidden_states"]), tokens)))
        return args, kwargs

    handles = [block.register_forward_pre_hook(constrain_input, with_kwargs=True) for block in module.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def call_transformer(manager: TorchaxEnvManager, module, weights: dict, mesh, hidden, timesteps, context, *,
                     record_residual: bool = False, block_residual=None, image_embeds=None,
                     split: "sharding.TokenSplit | None" = None):
    """The Wan transformer's velocity [B, 16, T, h, w] for jax arrays, inside ``jax.jit``;
    Splash attention (where chosen) shards over ``mesh``.

    MagCache: ``record_residual`` also returns the blocks' residual [B, tokens, dim];
    ``block_residual`` skips the blocks and reuses it (see ``magcache``).
    ``image_embeds``: Wan 2.1 I2V's CLIP tokens [B, n, clip_dim], attended in cross-attention.
    ``split``: the sequence layout's token split (``sharding.token_split``); None for the tensor layout.
    """
    reuse = None if block_residual is None else manager.env.j2t_iso(block_residual)
    kwargs = {"return_dict": False}
    if image_embeds is not None:
        kwargs["encoder_hidden_states_image"] = image_embeds
    with manager.active_mesh(mesh, split), _split_tokens(manager, module, mesh, split), \
            _block_cache(module, record_residual, reuse) as captured:
        return call_torch_module(
            manager, module, weights, "forward", (hidden, timesteps, context), kwargs,
            pick=(lambda output: (output[0], captured["residual"])) if record_residual else (lambda output: output[0]),
        )


def place_weights(manager: TorchaxEnvManager, module, rules, mesh, component: str):
    """Copy ``module``'s parameters and buffers onto ``mesh`` following ``rules``.

    Each tensor goes straight from host memory to its shards (never whole onto
    one device). The module's own tensors are then moved to the meta device to
    free host memory; it keeps only its structure. Returns (weights, plan).
    """
    jax = manager.jax
    # Tied weights (UMT5's shared embedding) appear under each name, placed once.
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, rules, dict(mesh.shape))
    named = sharding.to_named_shardings(plan, mesh)
    weights, placed = {}, {}
    try:
        with device_errors(f"loading the {component}", "Use a mesh with more devices (tp), or fp32 -> bf16."):
            for name, tensor in state.items():
                if id(tensor) not in placed:
                    placed[id(tensor)] = jax.device_put(torch_to_numpy(tensor), named[name])
                weights[name] = placed[id(tensor)]
    except BaseException:
        for array in placed.values():
            array.delete()
        raise
    module.to("meta")
    unique = {id(a): (n, a) for n, a in weights.items()}.values()
    total = sum(a.nbytes for _, a in unique)
    per_device = plan.bytes_per_device(
        {n: a.shape for n, a in unique}, {n: a.dtype.itemsize for n, a in unique}, dict(mesh.shape)
    )
    logger.info(
        "%s: %d tensors, %.1f MiB in all, %.1f MiB per device on mesh %s",
        component, len(weights), total / 2**20, per_device / 2**20, dict(mesh.shape),
    )
    return weights, plan


def _shape_key(args) -> tuple:
    """Shapes and dtypes of a pytree of arrays: what a compiled program is specialised to."""
    import jax

    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(args))


def compiled_program(cache: dict, key: tuple, jitted, args: tuple, on_status: Callable | None, what: str,
                     fix: str = "Lower the resolution or num_frames, or use more devices.", device=None):
    """``jitted`` compiled ahead of time for ``args``, cached under ``key``, and checked against HBM.

    Compiling before the first run (rather than inside it) lets progress say
    "compiling" and keeps compile time out of the per-step times and the ETA.
    A program already in JAX's persistent cache loads instead of compiling.
    Before it runs, its own ``memory_analysis()`` is checked against ``device``'s
    memory (``memory_plan.check_compiled_memory``): a program that will not fit
    is refused with ``HBMPlanError`` saying how much it needs and ``fix``.
    """
    compiled = cache.get(key)
    if compiled is None:
        if on_status is not None:
            on_status(f"compiling {what} (first run at this size; later runs reuse it)")
        started = time.perf_counter()
        compiled = cache[key] = jitted.lower(*args).compile()
        logger.info("compiled %s in %.1f s", what, time.perf_counter() - started)
    memory_plan.check_compiled_memory(compiled, what[:1].upper() + what[1:], fix, device=device)
    return compiled


def unique_arrays(weights: dict) -> list:
    """The distinct arrays of a weights dict (tied weights appear once)."""
    return list({id(array): array for array in weights.values()}.values())


def gather_split_weights(manager: TorchaxEnvManager, weights: dict, plan_specs: dict, mesh) -> dict:
    """The sequence layout's weights, inside ``jax.jit``: every split one (but ``sharding.SEQUENCE_KEEP_SPLIT``)
    constrained whole, so XLA gathers each where its layer uses it (FSDP-style), layer by layer."""
    from jax.sharding import NamedSharding, PartitionSpec

    whole = NamedSharding(mesh, PartitionSpec())
    gathered = sharding.sequence_gathered_weights(plan_specs)
    constrain = manager.jax.lax.with_sharding_constraint
    return {name: constrain(value, whole) if name in gathered else value for name, value in weights.items()}


def whole_weight_copies(manager: TorchaxEnvManager, weights: dict, plan_specs: dict, mesh) -> tuple[dict, list]:
    """The sequence layout with whole weights: ``weights`` with every weight it would gather per layer
    (``sharding.sequence_gathered_weights``) replaced by a whole copy on every device, made once for a run
    so that no step gathers them. Returns (the weights for the step, the copies: delete them after the run)."""
    from jax.sharding import NamedSharding, PartitionSpec

    whole = NamedSharding(mesh, PartitionSpec())
    copies = {}
    try:
        for name in sorted(sharding.sequence_gathered_weights(plan_specs)):
            copies[name] = manager.jax.device_put(weights[name], whole)
    except BaseException:
        for array in copies.values():
            array.delete()
        raise
    return {**weights, **copies}, list(copies.values())


_SMALL_PROGRAMS = {}  # tiny jitted helpers, made on first use (jax specialises them per shape)


def residual_norm_ratio(jax):
    """MagCache's magnitude ratio per batch entry, jitted: the mean over tokens of |r| / (|r_prev| + 1e-8),
    norms over channels in float32, as diffusers' calibration computes it. Only scalars leave the device."""
    if "norm_ratio" not in _SMALL_PROGRAMS:
        jnp = jax.numpy

        def ratio(residual, previous):
            current = jnp.linalg.norm(residual.astype(jnp.float32), axis=-1)
            before = jnp.linalg.norm(previous.astype(jnp.float32), axis=-1)
            return jnp.mean(current / (before + 1e-8), axis=-1)

        _SMALL_PROGRAMS["norm_ratio"] = jax.jit(ratio)
    return _SMALL_PROGRAMS["norm_ratio"]


def middle_frame(jax):
    """A latent's middle frame [C, h, w] of its first video, jitted, so a preview copies only that."""
    if "middle_frame" not in _SMALL_PROGRAMS:
        _SMALL_PROGRAMS["middle_frame"] = jax.jit(lambda latent: latent[0, :, latent.shape[2] // 2])
    return _SMALL_PROGRAMS["middle_frame"]


def _activation_sharding(mesh, batch: int, layout: str):
    """[batch, tokens, dim]: split over dp like the batch, and in the sequence layout by token too."""
    if layout != "sequence":
        return _batch_sharding(mesh, batch)
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*sharding.token_split(dict(mesh.shape), batch).spec()))


def _batch_sharding(mesh, batch: int):
    """Split a batch over dp when dp divides it, else replicate."""
    from jax.sharding import NamedSharding, PartitionSpec

    if batch % mesh.shape["dp"] == 0 and mesh.shape["dp"] > 1:
        return NamedSharding(mesh, PartitionSpec("dp"))
    return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------ components
@dataclass
class TextEncoderComponent:
    tokenizer: Any
    module: Any
    weights: dict
    plan: sharding.ShardingPlan
    mesh: Any
    encode_fn: Callable
    text_dim: int


@dataclass
class TransformerComponent:
    module: Any
    weights: dict
    plan: sharding.ShardingPlan
    mesh: Any
    config: dict
    scheduler_config: dict
    dtype: Any
    device_loras: Any = None  # lora.DeviceLoras, made on the first LoRA: applies and undoes LoRAs in place
    step_fns: dict = field(default_factory=dict)  # (cfg, cache_mode, layout) -> jitted step
    compiled_steps: dict = field(default_factory=dict)  # (cfg, cache_mode, layout, shapes) -> compiled executable


@dataclass
class VAEComponent:
    module: Any
    weights: dict
    plan: sharding.ShardingPlan
    mesh: Any
    decoder: "VAEChunkDecoder"
    latents_mean: np.ndarray  # [16]
    latents_std: np.ndarray  # [16]
    encoder: "VAEChunkEncoder | None" = None  # image-to-video only


@dataclass
class ImageEncoderComponent:
    """Wan 2.1 I2V's CLIP vision tower and its (host) image processor."""

    processor: Any
    module: Any
    weights: dict
    plan: sharding.ShardingPlan
    mesh: Any
    encode_fn: Callable


class WanTPUPipeline:
    """Wan 2.1 T2V on the JAX default backend (TPU, GPU or CPU).

    ``model_id``: repo id or folder; ``precision``: 'bf16' or 'fp32' for the
    text encoder and transformer (the VAE always runs in fp32); ``dp``/``tp``:
    mesh override (default: dp=2 when the device count is even). ``layout``: how
    the denoising step splits the transformer, "tensor", "sequence" or "auto"
    (None: ``WAN_TPU_LAYOUT``, else "auto": the one whose collectives move fewer
    bytes, ``sharding.choose_layout``). Both use the same weights.
    """

    def __init__(self, model_id: str = loading.DEFAULT_MODEL_ID, precision: str = "bf16", dp: int | None = None,
                 tp: int | None = None, manager: TorchaxEnvManager | None = None, layout: str | None = None):
        if precision not in loading.PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {loading.PRECISIONS}")
        self.layout = (sharding.check_layout(layout) if layout else
                       sharding.check_layout(os.environ.get(sharding.ENV_LAYOUT), given_as=sharding.ENV_LAYOUT))
        from .model_files import FileSource

        # model_id: a repo id or diffusers folder, or ComfyUI single files (model_files.FileSource).
        self.source = model_id if isinstance(model_id, FileSource) else loading.resolve_model_source(model_id)
        if isinstance(self.source, FileSource):
            from .model_files import check_files

            check_files(self.source)  # headers only: a wrong or broken file is named before anything runs
        self.precision = precision
        self.dp, self.tp = dp, tp
        self.manager = manager or TorchaxEnvManager.instance()
        self.timer = StageTimer()
        self.last_step_seconds: list[float] = []

    # -------------------------------------------------------------- caching
    def matmul_precision(self):
        """The matmul precision the text encoder and transformer are traced with.

        fp32 asks XLA for full fp32 matmuls ("highest"): on TPU its default
        would multiply fp32 operands in bf16 passes. bf16 keeps the default.
        The VAE (fp32 weights) always keeps XLA's default, for speed.
        """
        return self.manager.jax.default_matmul_precision("highest" if self.precision == "fp32" else None)

    @property
    def mesh(self):
        return self.manager.mesh(self.dp, self.tp)

    def _key(self, kind: str) -> tuple:
        precision = "fp32" if kind in ("vae", "image_encoder") else self.precision
        mesh_shape = tuple(self.mesh.shape.values())
        return (kind, self.source.component_location(kind), precision, mesh_shape)

    def _cached(self, kind: str, build: Callable):
        key = self._key(kind)
        if key not in self.manager.cached_keys():
            # Check the folder before the old component of this kind is released for it.
            loading.check_component(self.source, kind)
        # Another model's component of this kind goes first; so does another model's second
        # expert when its first is replaced (a Wan 2.1 model after a Wan 2.2 A14B one).
        kinds = ("transformer", "transformer_2") if kind == "transformer" else (kind,)
        return self.manager.cached_component(
            key, build, replaces=lambda other: other[0] == kind or (other[0] in kinds and other[1] != key[1])
        )

    @property
    def family(self) -> families.WanFamily:
        """The model family, from the folder's model_index.json (Wan 2.1 T2V when it has none)."""
        if getattr(self, "_family", None) is None and not isinstance(self.source, loading.ModelSource):
            from . import model_files

            self._family = model_files.family(self.source)  # from the weights; an error says which file to fix
        if getattr(self, "_family", None) is None:
            try:
                model_index = loading.load_model_index(self.source)
            except (ValueError, OSError):
                logger.info("%s has no model_index.json: taken as Wan 2.1 T2V", self.source.describe())
                model_index = {}
            self._family = families.family_from_model_index(model_index, repr(self.source.model_id))
        return self._family

    def text_encoder(self) -> TextEncoderComponent:
        def build():
            mesh = self.mesh
            with self.timer("load_text_encoder"), self.manager.loading():
                tokenizer = loading.load_tokenizer(self.source)
                module = loading.load_text_encoder(self.source, self.precision)
            weights, plan = place_weights(self.manager, module, sharding.TEXT_ENCODER_RULES, mesh, "text encoder")
            component = TextEncoderComponent(
                tokenizer, module, weights, plan, mesh, self._make_encode_fn(module, mesh), module.config.d_model
            )
            return component, unique_arrays(weights)

        return self._cached("text_encoder", build)

    def transformer(self, expert: str = "transformer") -> TransformerComponent:
        """A transformer expert: "transformer" (every family; Wan 2.2 A14B's high-noise expert) or
        "transformer_2" (Wan 2.2 A14B's low-noise expert). Both experts of A14B stay resident."""
        def build():
            mesh = self.mesh
            with self.timer(f"load_{expert}"), self.manager.loading():
                scheduler_config = loading.load_json_config(self.source, "scheduler", "scheduler_config.json")
                UniPCFlowSchedule.create(scheduler_config, 1, 1.0)  # refuse an unsupported scheduler before loading
                module = loading.load_transformer(self.source, self.precision, expert)
            weights, plan = place_weights(self.manager, module, sharding.TRANSFORMER_RULES, mesh, expert)
            component = TransformerComponent(
                module, weights, plan, mesh, dict(module.config), scheduler_config, module.dtype
            )
            return component, unique_arrays(weights)

        return self._cached(expert, build)

    def experts(self, on_status: Callable[[str], None] | None = None) -> list[TransformerComponent]:
        """The family's transformer experts, loaded (high-noise first)."""
        loaded = []
        for expert in self.family.experts:
            self._status(on_status, expert, "transformer" if expert == "transformer" else "low-noise transformer")
            loaded.append(self.transformer(expert))
        if len(loaded) == 2 and loaded[0].config != loaded[1].config:
            raise ValueError(f"{self.source.model_id!r}: its two transformer experts have different configs; "
                             f"Wan 2.2 A14B's experts share one architecture, so this folder is not one")
        return loaded

    def vae(self) -> VAEComponent:
        def build():
            mesh = self.mesh
            with self.timer("load_vae"), self.manager.loading():
                module = loading.load_vae(self.source)
            weights, plan = place_weights(self.manager, module, sharding.VAE_RULES, mesh, "VAE")
            config = module.config
            component = VAEComponent(
                module, weights, plan, mesh, VAEChunkDecoder(self.manager, module, mesh),
                np.asarray(config.latents_mean, np.float32), np.asarray(config.latents_std, np.float32),
                VAEChunkEncoder(self.manager, module, mesh),
            )
            return component, unique_arrays(weights)

        return self._cached("vae", build)

    def image_encoder(self) -> ImageEncoderComponent:
        """Wan 2.1 I2V's CLIP vision tower (fp32, split over tp), for ``encode_image``."""
        def build():
            mesh = self.mesh
            with self.timer("load_image_encoder"), self.manager.loading():
                processor = loading.load_image_processor(self.source)
                module = loading.load_image_encoder(self.source)
            weights, plan = place_weights(self.manager, module, sharding.IMAGE_ENCODER_RULES, mesh, "image encoder")
            jax = self.manager.jax

            def encode(weights, pixel_values):
                # diffusers' Wan I2V takes the penultimate layer's hidden states.
                return call_torch_module(self.manager, module, weights, "forward", (pixel_values,),
                                         {"output_hidden_states": True}, pick=lambda out: out.hidden_states[-2])

            component = ImageEncoderComponent(processor, module, weights, plan, mesh, jax.jit(encode))
            return component, unique_arrays(weights)

        return self._cached("image_encoder", build)

    def memory_plan(self, height: int, width: int, num_frames: int, guidance_scale: float,
                    layout: str | None = None) -> "memory_plan.MemoryPlan":
        """Per-device HBM this run will need, from the configs alone; logged, and raised
        (``HBMPlanError``) before anything loads when it will not fit. ``layout``: the step's (None: the
        pipeline's; "auto" plans the one ``step_layout`` will choose)."""
        configs = {name: loading.load_json_config(self.source, name) for name in ("transformer", "text_encoder", "vae")}
        mesh = self.mesh
        plan = memory_plan.plan_memory(
            configs["transformer"], dict(mesh.shape), height, width, num_frames, self.precision,
            cfg=guidance_scale > 1.0, text_encoder_config=configs["text_encoder"], vae_config=configs["vae"],
            experts=len(self.family.experts),
            device=mesh.devices.flat[0], layout=layout or self.layout,
        )
        logger.info("HBM plan: %s", plan.summary())
        return plan.check()

    @property
    def vae_geometry(self) -> VAEGeometry:
        """The VAE's latent channels and downsampling, from its config (Wan 2.1: 16, 8x; Wan 2.2: 48, 16x)."""
        return VAEGeometry.from_config(loading.load_json_config(self.source, "vae"))

    def vae_latent_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(latents_mean, latents_std) from the VAE's config, without loading the VAE."""
        config = loading.load_json_config(self.source, "vae")
        return np.asarray(config["latents_mean"], np.float32), np.asarray(config["latents_std"], np.float32)

    # ------------------------------------------------------ compiled stages
    def _make_encode_fn(self, module, mesh):
        jax, manager = self.manager.jax, self.manager

        def encode(weights, input_ids, attention_mask):
            hidden = call_torch_module(
                manager, module, weights, "forward", (input_ids, attention_mask),
                pick=lambda output: output.last_hidden_state,
            )
            # diffusers trims each prompt to its length and pads with zeros.
            return hidden.astype(jax.numpy.float32) * attention_mask[..., None].astype(jax.numpy.float32)

        return jax.jit(encode)

    def apply_loras(self, loras=(), on_status: Callable[[str], None] | None = None) -> None:
        """Fuse ``loras`` (``lora.LoraSpec``s) into the cached transformers' weights on the device.

        Each LoRA goes into the expert its ``expert`` names: "both" (every transformer), or Wan 2.2
        A14B's "high_noise" (``transformer``) or "low_noise" (``transformer_2``) one. The weights
        change in place and keep their shapes and shardings, so nothing recompiles; the bases of
        changed weights are kept on the host, per expert, so another list (or none) restores them
        exactly without reading the model again. Every LoRA is checked against its expert before
        any weight changes. The manager's release then frees the new arrays.
        """
        from .lora import EXPERT_INDEX, DeviceLoras, LoraSpec

        loras = [spec if isinstance(spec, LoraSpec) else LoraSpec(*spec) for spec in (loras or ())]
        family = self.family
        for spec in loras:
            if spec.expert != "both" and not family.two_experts:
                raise ValueError(f"LoRA {os.path.basename(spec.path)!r} is for the {spec.expert} expert, but "
                                 f"{self.source.model_id!r} ({family.name}) has one transformer: set its expert "
                                 f"to 'both'")
        experts = self.experts(on_status)
        wanted = [[spec for spec in loras if spec.expert == "both" or EXPERT_INDEX[spec.expert] == index]
                  for index in range(len(experts))]
        for transformer, specs in zip(experts, wanted):
            if transformer.device_loras is None and specs:
                transformer.device_loras = DeviceLoras(self.manager, transformer.mesh)
        for transformer, specs in zip(experts, wanted):  # every LoRA read and checked before any weight changes
            if transformer.device_loras is not None and not transformer.device_loras.applied(specs):
                transformer.device_loras.check(transformer.weights, specs)
        if on_status is not None and loras:
            on_status(f"applying {len(loras)} LoRA(s)")
        for name, transformer, specs in zip(family.experts, experts, wanted):
            if transformer.device_loras is None:
                continue
            before = transformer.device_loras.state
            with device_errors("applying the LoRA", "Use fewer or lower-rank LoRAs, or more devices."):
                transformer.device_loras.apply(transformer.weights, specs)
            if transformer.device_loras.state != before:
                self.manager.set_component_arrays(self._key(name), unique_arrays(transformer.weights))

    def _block_residual_spec(self, transformer: TransformerComponent, sample_shape, batch: int,
                             layout: str = "tensor"):
        """The MagCache residual's shape, dtype and sharding: [batch, tokens, inner_dim], split over dp
        like the batch, and in the sequence layout over its tokens too (the "record" step constrains it
        to this)."""
        jax = self.manager.jax
        config = transformer.config
        _, _, frames, height, width = sample_shape
        p_t, p_h, p_w = config["patch_size"]
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        dtype = jax.numpy.bfloat16 if "bfloat16" in str(transformer.dtype) else jax.numpy.float32
        return jax.ShapeDtypeStruct((batch, tokens, dim), dtype,
                                    sharding=_activation_sharding(transformer.mesh, batch, layout))

    def _make_step_fn(self, transformer: TransformerComponent, cfg: bool, cache_mode: str | None = None,
                      expand_timesteps: bool | None = None, layout: str = "tensor"):
        """The jitted denoising step: transformer, CFG combine, UniPC-form update.

        ``cache_mode`` (MagCache): None, the plain step; "record", the step also
        returns the blocks' residual; "reuse", the step takes a residual and
        skips the blocks. ``layout``: "tensor" or "sequence" (``sharding.LAYOUTS``).
        """
        jax, manager = self.manager.jax, self.manager
        jnp = jax.numpy
        from jax.sharding import NamedSharding, PartitionSpec

        mesh, module, dtype = transformer.mesh, transformer.module, transformer.dtype
        replicated = NamedSharding(mesh, PartitionSpec())
        batch = 2 if cfg else 1
        batch_sharding = _batch_sharding(mesh, batch)
        residual_sharding = _activation_sharding(mesh, batch, layout)
        split = sharding.token_split(dict(mesh.shape), batch) if layout == "sequence" else None
        jax_dtype = jnp.bfloat16 if "bfloat16" in str(dtype) else jnp.float32
        if expand_timesteps is None:  # TI2V: a timestep per token (the compile command says it explicitly)
            expand_timesteps = self.family.expand_timesteps

        def step(weights, state, context, coefficients, timestep, guidance_scale, block_residual=None,
                 conditioning=None):
            sample, last_sample, m1, m2 = state
            if split is not None:
                weights = gather_split_weights(manager, weights, transformer.plan.specs, mesh)
            model_input = sample
            if cfg:  # cond and uncond as one batch of 2, split over dp
                model_input = jnp.concatenate([model_input, model_input])
            image_embeds = None
            timesteps = jnp.full((batch,), timestep, jnp.float32)
            if expand_timesteps:  # TI2V: the given first frame in place, a timestep per token (0 on it)
                given, keep = conditioning
                model_input = (1 - keep) * given + keep * model_input
                p_t, p_h, p_w = transformer.config["patch_size"]
                per_token = (keep[0, 0, ::p_t, ::p_h, ::p_w] * timestep).reshape(-1)
                timesteps = jnp.broadcast_to(per_token, (batch, per_token.shape[0]))
            elif conditioning is not None:  # image-to-video: the first-frame mask and latents beside the noise
                condition, image_embeds = conditioning
                model_input = jnp.concatenate([model_input, condition], axis=1)
            model_input = jax.lax.with_sharding_constraint(model_input.astype(jax_dtype), batch_sharding)
            velocity = call_transformer(manager, module, weights, mesh, model_input, timesteps, context,
                                        record_residual=cache_mode == "record", block_residual=block_residual,
                                        image_embeds=image_embeds, split=split)
            if cache_mode == "record":
                velocity, block_residual = velocity
                block_residual = jax.lax.with_sharding_constraint(block_residual, residual_sharding)
            velocity = velocity.astype(jnp.float32)
            if cfg:
                cond, uncond = velocity[:1], velocity[1:]
                velocity = uncond + guidance_scale * (cond - uncond)
            next_sample, corrected, m = unipc_update(coefficients, sample, velocity, last_sample, m1, m2)
            state = tuple(jax.lax.with_sharding_constraint(x, replicated) for x in (next_sample, corrected, m, m1))
            return (state, block_residual) if cache_mode == "record" else state

        return jax.jit(step, donate_argnums=(1,))

    def step_layout(self, transformer: TransformerComponent, height: int, width: int, num_frames: int,
                    batch: int, layout: str | None = None) -> str:
        """The layout this run's step uses: ``layout`` (else the pipeline's), or for "auto" the cost model's."""
        mesh = transformer.mesh
        layout, why = memory_plan.resolve_layout(layout or self.layout, transformer.config, dict(mesh.shape), height,
                                                 width, num_frames, batch == 2, mesh.devices.flat[0].device_kind)
        if why is not None:
            logger.info("layout %s (auto): %s", layout, why)
        return layout

    # --------------------------------------------------------------- stages
    def _status(self, on_status: Callable | None, kind: str, label: str) -> None:
        """Tell ``on_status`` when ``kind`` is about to be loaded (not cached yet)."""
        if on_status is not None and self._key(kind) not in self.manager.cached_keys():
            on_status(f"loading the {label}")

    def encode(self, prompt: str, negative_prompt: str = "", on_status: Callable[[str], None] | None = None
               ) -> WanEmbeddings:
        """UMT5 embeddings of ``prompt`` and ``negative_prompt`` (diffusers' semantics, 512 tokens).

        ``on_status(text)`` hears "loading ..." and "encoding ..." as they start."""
        import torch
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: give the prompt as text")
        self._status(on_status, "text_encoder", "text encoder")
        component = self.text_encoder()
        if on_status is not None:
            on_status("encoding the prompt")
        jax = self.manager.jax
        with self.timer("encode"):
            tokens = component.tokenizer(
                [prompt_clean(prompt), prompt_clean(negative_prompt or "")],
                padding="max_length", max_length=loading.MAX_SEQUENCE_LENGTH, truncation=True,
                add_special_tokens=True, return_attention_mask=True, return_tensors="np",
            )
            batch_sharding = _batch_sharding(component.mesh, 2)
            ids = jax.device_put(tokens["input_ids"].astype(np.int32), batch_sharding)
            mask = jax.device_put(tokens["attention_mask"].astype(np.int32), batch_sharding)
            with device_errors("the text encoder", "Use a mesh with more devices."), self.matmul_precision():
                hidden = np.asarray(component.encode_fn(component.weights, ids, mask))
        embeds = torch.from_numpy(hidden.copy())
        return WanEmbeddings(embeds[:1], embeds[1:], self.source.model_id)

    def encode_image(self, image, *, height: int = 480, width: int = 832, num_frames: int = 81,
                     on_status: Callable[[str], None] | None = None) -> WanImageConditioning:
        """An image-to-video model's conditioning on ``image`` (its first frame), as diffusers'
        ``WanImageToVideoPipeline`` makes it, with the VAE encoder and (Wan 2.1 I2V) CLIP on the device.

        ``image``: a PIL image, or an array [H, W, 3] (or [1, H, W, 3], ComfyUI's IMAGE) in [0, 1]; it is
        resized to ``width`` x ``height`` on the host by diffusers' own processors.
        """
        import torch
        from diffusers.video_processor import VideoProcessor

        family = self.family
        if not family.image_conditioning:
            raise ValueError(f"{self.source.model_id!r} is {family.name}, a text-to-video model: it takes no image. "
                             f"Use an image-to-video model (e.g. Wan-AI/Wan2.2-I2V-A14B-Diffusers), or leave the "
                             f"image out")
        geometry = self.vae_geometry
        check_video_shape(height, width, num_frames, geometry.spatial_factor)
        picture = as_pil_image(image)
        self.memory_plan(height, width, num_frames, guidance_scale=1.0)
        self._status(on_status, "vae", "VAE")
        vae = self.vae()
        jax = self.manager.jax
        from jax.sharding import NamedSharding, PartitionSpec

        if on_status is not None:
            on_status("encoding the image")
        with self.timer("encode_image"):
            pixels = VideoProcessor(vae_scale_factor=geometry.spatial_factor).preprocess(
                picture, height=height, width=width).to(torch.float32).numpy()  # [1, 3, H, W] in [-1, 1]
            if family.expand_timesteps:  # TI2V: the image alone becomes the first latent frame
                video = pixels[:, :, None]
            else:  # the image, then black frames: diffusers encodes the whole clip, the causal VAE carrying its cache
                video = np.zeros((1, 3, num_frames, height, width), np.float32)
                video[:, :, 0] = pixels
            means = vae.encoder.encode(vae.weights, video, on_status, device=vae.mesh.devices.flat[0])
            shape = (1, -1, 1, 1, 1)
            latents = ((means - vae.latents_mean.reshape(shape)) * (1.0 / vae.latents_std).reshape(shape)
                       ).astype(np.float32)
            if family.expand_timesteps:  # TI2V: the first latent frame itself, [1, 48, 1, h, w]
                condition = latents
            else:
                mask = np.zeros((1, VAE_TEMPORAL_FACTOR) + latents.shape[2:], np.float32)
                mask[:, :, 0] = 1.0  # the first latent frame is given; the rest are generated
                condition = np.concatenate([mask, latents], axis=1)
            image_embeds = None
            if family.clip_image_encoder:
                self._status(on_status, "image_encoder", "image encoder")
                clip = self.image_encoder()
                pixel_values = clip.processor(images=picture, return_tensors="np")["pixel_values"].astype(np.float32)
                pixel_values = jax.device_put(pixel_values, NamedSharding(clip.mesh, PartitionSpec()))
                with device_errors("the image encoder", "Use a mesh with more devices."), self.matmul_precision():
                    image_embeds = torch.from_numpy(np.asarray(clip.encode_fn(clip.weights, pixel_values)).copy())
        return WanImageConditioning(torch.from_numpy(condition), image_embeds, self.source.model_id,
                                    int(height), int(width), int(num_frames))

    def _check_image(self, image: WanImageConditioning | None, transformer: TransformerComponent,
                     height: int, width: int, num_frames: int) -> None:
        """Refuse, naming the fix, an image where the model takes none, none where it needs one, or one
        made for another size or model."""
        family, model = self.family, repr(self.source.model_id)
        if image is None:
            if family.image_conditioning and not family.image_optional:
                raise ValueError(f"{model} is {family.name}, an image-to-video model: give it the start image "
                                 f"(connect a 'Wan TPU Image to Video' node's output to the sampler's image, "
                                 f"or --image on the command line)")
            return
        if not isinstance(image, WanImageConditioning):
            raise ValueError(f"image={type(image).__name__}: give the output of encode_image (the 'Wan TPU Image "
                             f"to Video' node), not a raw image")
        if not family.image_conditioning:
            raise ValueError(f"{model} is {family.name}, a text-to-video model: it takes no image. Disconnect the "
                             f"image, or use an image-to-video model")
        made, wanted = (image.width, image.height, image.num_frames), (width, height, num_frames)
        if made != wanted:
            raise ValueError(f"the image conditioning was made for {made[0]}x{made[1]}, {made[2]} frames, but this "
                             f"run is {width}x{height}, {num_frames} frames: give both the same width, height and "
                             f"frames")
        channels = transformer.config["in_channels"] - transformer.config["out_channels"]
        if family.expand_timesteps:  # TI2V: the image's latents replace the first latent frame
            channels = transformer.config["out_channels"]
        if image.condition.shape[1] != channels:
            raise ValueError(f"the image conditioning has {image.condition.shape[1]} channels but {model} takes "
                             f"{channels}: encode the image with the same model")
        takes_clip = transformer.config.get("image_dim") is not None
        if takes_clip != (image.image_embeds is not None) or (
                takes_clip and image.image_embeds.shape[-1] != transformer.config["image_dim"]):
            raise ValueError(f"the image conditioning came from {image.model_id!r}, whose image encoding does not "
                             f"fit {model} ({family.name}): encode the image with the same model")

    def denoise(self, embeddings: WanEmbeddings, *, height: int = 720, width: int = 1280, num_frames: int = 81,
                num_inference_steps: int = 50, guidance_scale: float = 5.0, seed: int = 0, flow_shift: float = 5.0,
                on_step: Callable[[int, int], None] | None = None, on_status: Callable[[str], None] | None = None,
                sampler: str = "unipc", timesteps=None, magcache: MagCacheSettings | None = None, loras=(),
                guidance_scale_2: float | None = None, image: WanImageConditioning | None = None,
                layout: str | None = None, magcache_calibrate: bool = False,
                on_preview: Callable[[np.ndarray], None] | None = None):
        """Denoise from the seed's noise; returns VAE latents [1, 16, T, H/8, W/8] float32 on CPU.

        ``layout``: how the step splits the transformer over the mesh, "tensor", "sequence" or "auto";
        None: the pipeline's (``WanTPUPipeline(layout=...)``, ``WAN_TPU_LAYOUT``, else "auto").

        ``image``: for image-to-video models, ``encode_image``'s conditioning (made for this size).

        ``on_preview(frame)``: after every step, before ``on_step``, the predicted clean latent's middle
        frame [C, h, w] (numpy, float32, in the transformer's normalised space) for a live preview. Only
        that frame leaves the device, and only when ``on_preview`` is given.

        ``on_step(i, total)`` runs once with i=0 when loading and compiling are
        done and the first step starts, then after every step; an exception
        from it (a Cancel) stops the run, and the cached components stay
        usable. ``on_status(text)`` hears "loading ..." and "compiling ...".
        Guidance above 1 runs cond and uncond as one batch of 2.

        ``sampler``: "unipc" (the model's scheduler) or "euler" (flow-matching
        Euler with shift ``flow_shift`` and optional explicit ``timesteps``).
        ``magcache``: MagCache settings, or None for every step in full.
        ``self.last_run`` then says how many steps ran the transformer.
        ``magcache_calibrate``: run every step in full and record MagCache's magnitude ratios, saved
        for this model (``magcache.save_calibration``): later MagCache runs of it use them.
        ``self.last_run["magcache_ratios"]`` and ``["magcache_calibration"]`` (the file) say what was saved.
        ``loras``: ``lora.LoraSpec``s fused into the transformers' weights on the
        device for this run (and kept until another list is given; () undoes them);
        each goes into the expert its ``expert`` names.

        Two-expert families (Wan 2.2 A14B): steps whose timestep is below the
        boundary run the low-noise expert, with ``guidance_scale_2`` (None: the
        same as ``guidance_scale``); CFG runs when ``guidance_scale`` > 1, as in
        diffusers. Both experts share one compiled step (same shapes).
        """
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        geometry = self.vae_geometry
        check_video_shape(height, width, num_frames, geometry.spatial_factor)
        layout = sharding.check_layout(layout or self.layout)  # before anything loads
        if not 0 <= guidance_scale <= 100:
            raise ValueError(f"guidance_scale={guidance_scale}: use a value between 0 and 100 (5.0 is typical)")
        family = self.family
        if guidance_scale_2 is not None and not family.two_experts:
            raise ValueError(f"guidance_scale_2={guidance_scale_2} is for two-expert models (Wan 2.2 A14B); "
                             f"{self.source.model_id!r} is {family.name}: leave it unset")
        plan = self.memory_plan(height, width, num_frames, guidance_scale, layout)
        experts = self.experts(on_status)
        transformer = experts[0]
        if embeddings.text_dim != transformer.config["text_dim"]:
            raise ValueError(
                f"the embeddings have width {embeddings.text_dim} (from {embeddings.model_id!r}) but "
                f"{self.source.model_id!r} expects {transformer.config['text_dim']}: encode the prompt with the "
                f"same model's Text Encoder"
            )
        self._check_image(image, transformer, height, width, num_frames)
        schedule = make_schedule(sampler, transformer.scheduler_config, num_inference_steps, flow_shift, timesteps)
        total = len(schedule.timesteps)
        train_steps = transformer.scheduler_config.get("num_train_timesteps", 1000)
        expert_of_step = [family.expert_for(float(t), train_steps) for t in schedule.timesteps]
        second_guidance = guidance_scale if guidance_scale_2 is None else float(guidance_scale_2)
        guidance_of_step = [guidance_scale if e == 0 else second_guidance for e in expert_of_step]
        modes = self._step_modes(transformer, magcache, magcache_calibrate, expert_of_step, height, width, image)
        self.apply_loras(loras, on_status)
        calibration = []  # magcache_calibrate: per step, MagCache's magnitude ratio
        jax = self.manager.jax
        jnp = jax.numpy
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = transformer.mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        cfg = guidance_scale > 1.0
        batch = 2 if cfg else 1

        # The noise is drawn exactly as diffusers draws it (CPU generator, float32).
        generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = randn_tensor(geometry.latent_shape(height, width, num_frames), generator=generator,
                             dtype=torch.float32)
        context = [embeddings.prompt_embeds] + ([embeddings.negative_prompt_embeds] if cfg else [])
        context = torch.cat(context).to(torch.bfloat16 if self.precision == "bf16" else torch.float32)

        whole_copies = []  # the sequence layout's whole weights, made for this run: deleted when it ends
        with self.timer("denoise"), contextlib.ExitStack() as run_scope:
            run_scope.callback(lambda: [array.delete() for array in whole_copies])
            sample = jax.device_put(noise.numpy(), replicated)
            # The state is donated to each step, so each slot needs a buffer of its own.
            state = (sample, *(jnp.zeros(sample.shape, jnp.float32, device=replicated) for _ in range(3)))
            context = jax.device_put(torch_to_numpy(context), _batch_sharding(mesh, context.shape[0]))
            conditioning = None
            if family.expand_timesteps:
                # TI2V: a timestep per token; with an image, its latents are the first frame, whose tokens
                # get timestep 0 (diffusers' first_frame_mask). The mask is data, so T2V and I2V share a program.
                given = np.zeros(noise.shape, np.float32)
                keep = np.ones((1, 1) + tuple(noise.shape[2:]), np.float32)
                if image is not None:
                    given[:, :, :1] = image.condition.numpy()
                    keep[:, :, 0] = 0.0
                conditioning = (jax.device_put(given, replicated), jax.device_put(keep, replicated))
            elif image is not None:  # the same for cond and uncond: [batch, ...], split over dp like the batch
                condition = jax.device_put(np.repeat(image.condition.numpy(), batch, axis=0),
                                           _batch_sharding(mesh, batch))
                image_embeds = None
                if image.image_embeds is not None:
                    image_embeds = image.image_embeds.to(torch.float32).numpy()
                    image_embeds = jax.device_put(np.repeat(image_embeds, batch, axis=0).astype(context.dtype),
                                                  _batch_sharding(mesh, batch))
                conditioning = (condition, image_embeds)
            guidance = np.asarray(guidance_of_step, np.float32)  # per step: the two experts may differ
            coefficients, timesteps = schedule.coefficients, schedule.timesteps  # host arrays: data, not code
            layout = self.step_layout(transformer, height, width, num_frames, batch, layout)  # resolves "auto"
            # Where the HBM plan holds them, whole copies of the weights the sequence layout would gather every step.
            step_weights = [expert.weights for expert in experts]
            whole = layout == "sequence" == plan.layout and plan.whole_weights and len(experts) == 1
            if whole:
                if on_status is not None:
                    on_status("copying the weights whole onto every device")
                with device_errors("copying the weights whole onto every device",
                                   "Use layout='tensor' (its weights stay split, as loaded)."):
                    step_weights[0], whole_copies = whole_weight_copies(self.manager, transformer.weights,
                                                                        transformer.plan.specs, mesh)
            step_args = (step_weights[0], state, context, coefficients[0], timesteps[0], guidance[0])
            residual = self._block_residual_spec(transformer, sample.shape, batch, layout)
            # The optional trailing arguments: MagCache's residual (the "reuse" step), then the image.
            def extra(mode, residual):
                if conditioning is None:
                    return (residual,) if mode == "reuse" else ()
                return (residual if mode == "reuse" else None, conditioning)

            programs = {}
            with device_errors("compiling the transformer step", "Lower the resolution or num_frames, or use more devices."), \
                    self.matmul_precision():
                for mode in dict.fromkeys(modes):  # each program this run needs, compiled before step 1
                    key = (cfg, mode, layout)
                    if key not in transformer.step_fns:
                        transformer.step_fns[key] = self._make_step_fn(transformer, cfg, mode, layout=layout)
                    args = step_args + extra(mode, residual)
                    what = "the denoising step" + {None: "", "record": " (MagCache, full)", "reuse": " (MagCache, skip)"}[mode]
                    programs[mode] = compiled_program(transformer.compiled_steps, key + (_shape_key(args[1:]), whole),
                                                      transformer.step_fns[key], args, on_status, what,
                                                      device=mesh.devices.flat[0])
            self.last_step_seconds = []
            if on_step is not None:
                on_step(0, total)
            for i, mode in enumerate(modes):
                started = time.perf_counter()
                # The experts have the same shapes and shardings: one compiled step runs either's weights.
                args = (step_weights[expert_of_step[i]], state, context, coefficients[i], timesteps[i], guidance[i])
                with device_errors("the transformer", "Lower the resolution or num_frames, or use more devices."):
                    if mode == "record":
                        previous = residual if magcache_calibrate else None  # only a calibration keeps two
                        state, residual = programs[mode](*args, *extra(mode, residual))
                    else:
                        state = programs[mode](*args, *extra(mode, residual))
                    state[0].block_until_ready()
                    if magcache_calibrate:  # 1.0 where an expert starts: it has no residual of its own yet
                        same_expert = i > 0 and expert_of_step[i] == expert_of_step[i - 1]
                        calibration.append(float(residual_norm_ratio(jax)(residual, previous)[0])
                                           if same_expert else 1.0)
                        previous = None
                self.last_step_seconds.append(time.perf_counter() - started)
                if on_preview is not None:  # state[2]: the step's x0 prediction (UniPC's m)
                    on_preview(np.asarray(middle_frame(jax)(state[2])))
                if on_step is not None:
                    on_step(i + 1, total)
            latents = np.asarray(state[0])
            if family.expand_timesteps and image is not None:  # diffusers puts the image's frame back at the end
                given, keep = (np.asarray(x) for x in conditioning)
                latents = (1 - keep) * given + keep * latents
        evaluations = sum(mode != "reuse" for mode in modes)
        self.last_run = {"steps": total, "transformer_evaluations": evaluations, "skipped_steps": total - evaluations,
                         "sampler": sampler, "magcache": magcache is not None,
                         "low_noise_expert_steps": sum(expert_of_step), "layout": layout, "whole_weights": whole}
        if magcache is not None and not magcache_calibrate:
            logger.info("MagCache: %d of %d steps ran the transformer", evaluations, total)
        if magcache_calibrate:
            self.last_run["magcache_ratios"] = calibration
            self.last_run["magcache_calibration"] = save_calibration(
                self._ratio_source(transformer, height, width, image), calibration,
                {"steps": total, "sampler": sampler, "flow_shift": float(flow_shift), "guidance_scale": guidance_scale,
                 "height": height, "width": width, "num_frames": num_frames})
        mean, std = self.vae_latent_stats()
        return torch.from_numpy(to_vae_latents(latents, mean, std))

    def _step_modes(self, transformer: TransformerComponent, magcache: MagCacheSettings | None, calibrate: bool,
                    expert_of_step: list, height: int, width: int, image) -> list:
        """Per step, which program runs: None (plain), or with MagCache "record" (a full step that
        keeps the blocks' residual) or "reuse" (the blocks skipped). Decided here, on the host,
        before anything runs. A calibration records on every step."""
        if calibrate:
            if magcache is not None:
                logger.info("MagCache: calibrating, so every step runs in full")
            return ["record"] * len(expert_of_step)
        if magcache is None:
            return [None] * len(expert_of_step)
        ratios, origin = ratios_for(self._ratio_source(transformer, height, width, image), magcache)
        logger.info("MagCache ratios: %s", origin)
        return ["record" if run else "reuse" for run in run_schedule(expert_of_step, ratios, magcache)]

    def _ratio_source(self, transformer: TransformerComponent, height: int, width: int, image) -> RatioSource:
        """What MagCache's ratios are looked up by: this model, its family and shape, and the video."""
        model = os.path.realpath(self.source.location) if self.source.is_local else self.source.location
        return RatioSource(model, self.family.name, transformer.config, height, width, image is not None)

    def decode(self, latents, on_status: Callable[[str], None] | None = None) -> Any:
        """Frames [F, H, W, 3] float32 in [0, 1] (CPU) from VAE latents [B, 16, T, h, w].

        Batches are decoded one by one and their frames concatenated. The HBM
        plan is checked first, as before denoising.
        """
        import torch

        latents = torch.as_tensor(latents)
        if latents.ndim == 4:
            latents = latents.unsqueeze(0)
        geometry = self.vae_geometry
        if latents.ndim != 5 or latents.shape[1] != geometry.channels:
            f = geometry.spatial_factor
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: the VAE of {self.source.model_id!r} decodes "
                f"[batch, {geometry.channels}, frames, height/{f}, width/{f}]: decode with the model that made them"
            )
        _, _, latent_frames, latent_height, latent_width = latents.shape
        self.memory_plan(latent_height * geometry.spatial_factor, latent_width * geometry.spatial_factor,
                         (latent_frames - 1) * VAE_TEMPORAL_FACTOR + 1, guidance_scale=1.0)
        self._status(on_status, "vae", "VAE")
        component = self.vae()
        if on_status is not None:
            on_status("decoding the video")
        frames = []
        with self.timer("decode"):
            for item in latents.float():
                frames.append(component.decoder.decode(component.weights, item[None].numpy(), on_status,
                                                       device=component.mesh.devices.flat[0]))
        return torch.from_numpy(np.concatenate(frames))

    def generate(self, prompt: str, negative_prompt: str = "", on_status: Callable[[str], None] | None = None,
                 **denoise_args):
        """encode -> denoise -> decode; returns frames [F, H, W, 3]."""
        embeddings = self.encode(prompt, negative_prompt, on_status=on_status)
        latents = self.denoise(embeddings, on_status=on_status, **denoise_args)
        return self.decode(latents, on_status=on_status)


def as_pil_image(image):
    """A PIL RGB image from a PIL image or an array [H, W, 3] / [1, H, W, 3] in [0, 1] (ComfyUI's IMAGE).

    Both diffusers processors (the VAE's resize, CLIP's resize and crop) then see what a diffusers user
    gives them; an array is rounded to 8 bits, which is what an image file holds.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, np.float32)
    if array.ndim == 4 and array.shape[0] >= 1:
        if array.shape[0] > 1:
            logger.info("the image batch has %d images: the first is the start frame", array.shape[0])
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image of shape {tuple(array.shape)}: give an RGB image [height, width, 3] "
                         f"(ComfyUI's IMAGE, e.g. from Load Image)")
    return Image.fromarray(np.round(np.clip(array[..., :3], 0.0, 1.0) * 255).astype(np.uint8))


def to_vae_latents(latents: np.ndarray, latents_mean: np.ndarray, latents_std: np.ndarray) -> np.ndarray:
    """From the transformer's normalised latents to the VAE's own space.

    The one place the pack applies Wan's latents_mean/std: what ``denoise``
    returns, what ComfyUI's LATENT holds and what ``decode`` takes are all
    in the VAE's space.
    """
    shape = (1, -1, 1, 1, 1)
    return (latents * latents_std.reshape(shape) + latents_mean.reshape(shape)).astype(np.float32)
