"""The one jitted denoising step, and its arguments, shared by the pipeline, the compile-for-TPU command,
the benchmark and the tests: nobody else builds a step or its argument list.

A step is: the family's model input (``family.model_input``, traced), its transformer (``family.velocity``), the CFG combine,
and the UniPC-form update (``scheduler.unipc_update``). Prompts, guidance, timesteps and scheduler
coefficients are data, so one compiled program serves every run of a shape.

Arguments, in order: weights, state (sample, last sample, m1, m2; donated), context (Wan: [batch, tokens, dim];
another family's may be a tuple, ``family.context_shapes``),
coefficients, timestep, guidance_scale, then the block cache (MagCache's residual, DeepCache's outputs: the
"reuse" step; None otherwise)
and the family's conditioning (``family.step_conditioning``; None when it takes none).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .. import sharding
from ..runtime.placement import activation_sharding, batch_sharding, gather_split_weights, replicated
from ..scheduler import COEFFICIENT_NAMES, unipc_update

CACHE_MODES = (None, "record", "reuse")  # MagCache: the plain step, a full step keeping the blocks'
# residual, a step reusing it with the blocks skipped
DESCRIPTIONS = {None: "the denoising step", "record": "the denoising step (MagCache, full)",
                "reuse": "the denoising step (MagCache, skip)"}
ATTENTION_MODES = ("dense", "radial")  # radial: Radial attention's static sparse mask (opt-in; changes the video)


def radial_pattern(sample_shape, config):
    """Radial attention's mask for a latent ``sample_shape`` [1, C, T, h, w] and the transformer's patch: Wan's
    tokens are frames x height x width after patching."""
    from ..models.wan.radial import RadialPattern

    patch_t, patch_h, patch_w = config.get("patch_size", (1, 2, 2))
    _, _, frames, height, width = sample_shape
    return RadialPattern(frames // patch_t, (height // patch_h) * (width // patch_w))


@dataclass(frozen=True)
class StepKind:
    """What a compiled step is specialised to, beside its shapes."""

    cfg: bool  # cond and uncond as one batch of 2, split over dp
    cache_mode: str | None = None  # CACHE_MODES
    layout: str = "tensor"  # sharding.LAYOUTS: how the step splits the transformer over the mesh
    attention: str = "dense"  # ATTENTION_MODES: "radial" makes self-attention sparse (models.wan.radial)
    dense_blocks: int = 0  # with "radial": the first transformer blocks that stay dense

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1


def radial_steps(attention: str, num_inference_steps: int, dense_steps: int | None, dense_blocks: int | None):
    """Per step "dense" or "radial" (None: every step dense), and a radial step's dense blocks."""
    from ..models.wan import radial

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}: use 'dense' (the default) or 'radial' (Radial attention's "
                         "static sparse mask: opt-in, and it changes the video)")
    dense_steps = radial.DENSE_STEPS if dense_steps is None else dense_steps
    dense_blocks = radial.DENSE_BLOCKS if dense_blocks is None else dense_blocks
    for name, value in (("radial_dense_steps", dense_steps), ("radial_dense_blocks", dense_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: give a whole number >= 0 (the paper's: "
                             f"{radial.DENSE_STEPS} steps, {radial.DENSE_BLOCKS} block)")
    if attention == "dense":
        return None, 0
    return ["dense" if i < dense_steps else "radial" for i in range(num_inference_steps)], dense_blocks


class StepProgram:
    """The jitted step for one transformer (``runtime.components.TransformerComponent``, whose weights may
    be abstract), one family and one ``StepKind``."""

    def __init__(self, manager, family, transformer, kind: StepKind):
        if kind.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode={kind.cache_mode!r}: use one of {CACHE_MODES}")
        if kind.attention not in ATTENTION_MODES:
            raise ValueError(f"attention={kind.attention!r}: use one of {ATTENTION_MODES}")
        self.manager, self.family, self.transformer, self.kind = manager, family, transformer, kind
        self.jitted = manager.jax.jit(self._step, donate_argnums=(1,))

    @property
    def description(self) -> str:
        text = DESCRIPTIONS[self.kind.cache_mode]
        return text + " with radial attention" if self.kind.attention == "radial" else text

    @property
    def dtype(self):
        jnp = self.manager.jax.numpy
        return jnp.bfloat16 if "bfloat16" in str(self.transformer.dtype) else jnp.float32

    def _step(self, weights, state, context, coefficients, timestep, guidance_scale, block_residual=None,
              conditioning=None):
        jax, manager, kind = self.manager.jax, self.manager, self.kind
        jnp = jax.numpy
        transformer, mesh = self.transformer, self.transformer.mesh
        sample, last_sample, m1, m2 = state
        split = sharding.token_split(dict(mesh.shape), kind.batch) if kind.layout == "sequence" else None
        if split is not None:
            weights = gather_split_weights(manager, weights, transformer.plan.specs, mesh)
        model_input, timesteps, image_embeds = self.family.model_input(jnp, sample, timestep, conditioning,
                                                                       kind.batch, transformer.config)
        model_input = jax.lax.with_sharding_constraint(model_input.astype(self.dtype),
                                                       batch_sharding(mesh, kind.batch))
        record = kind.cache_mode == "record"
        sparse = contextlib.nullcontext()
        if kind.attention == "radial":
            sparse = manager.sparse_attention(radial_pattern(sample.shape, transformer.config), kind.dense_blocks)
        with sparse:
            velocity = self.family.velocity(manager, transformer, weights, model_input, timesteps, context,
                                            image_embeds, record=record, block_residual=block_residual,
                                            split=split)
        if record:
            velocity, block_residual = velocity
            where = activation_sharding(mesh, kind.batch, kind.layout)
            block_residual = jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, where),
                                                    block_residual)
        velocity = velocity.astype(jnp.float32)
        if kind.cfg:
            cond, uncond = velocity[:1], velocity[1:]
            velocity = uncond + guidance_scale * (cond - uncond)
        next_sample, corrected, m = unipc_update(coefficients, sample, velocity, last_sample, m1, m2)
        whole = replicated(mesh)
        state = tuple(jax.lax.with_sharding_constraint(x, whole) for x in (next_sample, corrected, m, m1))
        return (state, block_residual) if record else state

    # ------------------------------------------------------------------ arguments
    def trailing(self, block_residual, conditioning) -> tuple:
        """The optional trailing arguments: MagCache's residual (the "reuse" step), then the conditioning."""
        residual = block_residual if self.kind.cache_mode == "reuse" else None
        if conditioning is None:
            return (residual,) if residual is not None else ()
        return (residual, conditioning)

    def residual_spec(self, sample_shape):
        """The block cache's shapes (``family.residual_shapes``: MagCache's residual [batch, tokens, inner_dim]
        for Wan), dtype and sharding: split over dp like the batch, and in the sequence layout over its
        tokens too (the "record" step constrains it to this)."""
        jax, mesh, kind = self.manager.jax, self.transformer.mesh, self.kind
        where = activation_sharding(mesh, kind.batch, kind.layout)
        shapes = self.family.residual_shapes(self.transformer.config, tuple(sample_shape), kind.batch)
        return jax.tree_util.tree_map(lambda shape: jax.ShapeDtypeStruct(shape, self.dtype, sharding=where), shapes,
                                      is_leaf=lambda node: isinstance(node, tuple) and all(
                                          isinstance(n, int) for n in node))

    def place_conditioning(self, inputs) -> tuple | None:
        """The family's conditioning inputs on the mesh: host values put, abstract ones as ShapeDtypeStructs."""
        if inputs is None:
            return None
        jax, mesh = self.manager.jax, self.transformer.mesh
        placed = []
        for item in inputs:
            where = batch_sharding(mesh, self.kind.batch) if item.placement == "batch" else replicated(mesh)
            placed.append(jax.ShapeDtypeStruct(item.shape, jax.numpy.dtype(item.dtype), sharding=where)
                          if item.value is None else jax.device_put(item.value, where))
        return tuple(placed)

    def abstract_args(self, sample_shape, text_tokens: int, context_dtype: str) -> tuple:
        """Every argument as a ShapeDtypeStruct with its sharding (the weights as the transformer holds them),
        for ``jitted.lower`` without a model: the compile command and the tests."""
        jax, mesh, kind = self.manager.jax, self.transformer.mesh, self.kind
        jnp = jax.numpy
        whole = replicated(mesh)
        latents = jax.ShapeDtypeStruct(tuple(sample_shape), jnp.float32, sharding=whole)
        pair = batch_sharding(mesh, kind.batch)
        context = tuple(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=pair) for shape, dtype in
                        self.family.context_shapes(self.transformer.config, kind.batch, text_tokens, context_dtype))
        context = context[0] if len(context) == 1 else context
        coefficients = jax.ShapeDtypeStruct((len(COEFFICIENT_NAMES),), jnp.float32, sharding=whole)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)
        conditioning = self.place_conditioning(self.family.abstract_conditioning(
            self.transformer.config, tuple(sample_shape), kind.batch, context_dtype))
        args = (self.transformer.weights, (latents,) * 4, context, coefficients, scalar, scalar)
        return args + self.trailing(self.residual_spec(sample_shape), conditioning)
