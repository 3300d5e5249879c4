"""The production denoising step of the real Wan 2.1 architectures lowers for TPU.

The transformer is built on the meta device (nothing allocated), its weights
are abstract arrays carrying the shardings our rules give them on the (2, 4)
mesh, and the step is exported for TPU with the Splash kernel, as a v6e-8
would run it.
"""

import numpy as np
import pytest
from conftest import pack_module

env_manager = pack_module("env_manager")
memory_plan = pack_module("memory_plan")
pipeline_mod = pack_module("pipeline")
sharding = pack_module("sharding")
splash = pack_module("splash_attention")


@pytest.fixture
def manager(manager):
    manager.set_attention_backend("auto")
    yield manager
    manager.set_attention_backend(None)


@pytest.mark.parametrize("model, height, width", [("14B", 480, 848), ("14B", 720, 1280), ("1.3B", 480, 848)])
def test_denoising_step_exports_for_tpu_on_the_2x4_mesh(manager, model, height, width, monkeypatch):
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import WanTransformer3DModel
    from jax.sharding import NamedSharding, PartitionSpec

    with torch.device("meta"):
        module = WanTransformer3DModel(**memory_plan.WAN21_CONFIGS[model]).to(torch.bfloat16)
    mesh = env_manager.build_mesh(jax.devices())
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, sharding.TRANSFORMER_RULES,
                                   dict(mesh.shape))
    assert plan.unmatched == [] and plan.indivisible == []
    named = sharding.to_named_shardings(plan, mesh)
    weights = {name: jax.ShapeDtypeStruct(tuple(t.shape), jnp.dtype(str(t.dtype).removeprefix("torch.")),
                                          sharding=named[name]) for name, t in state.items()}
    transformer = pipeline_mod.TransformerComponent(
        module, weights, plan, mesh, dict(module.config), {}, torch.bfloat16
    )
    # The platform decides the attention: pretend to be the TPU we export for.
    monkeypatch.setattr(type(manager), "platform", property(lambda self: "tpu"))
    step = pipeline_mod.WanTPUPipeline.__new__(pipeline_mod.WanTPUPipeline)
    step.manager = manager
    step_fn = step._make_step_fn(transformer, cfg=True)

    replicated = NamedSharding(mesh, PartitionSpec())
    latents = jax.ShapeDtypeStruct(pipeline_mod.latent_shape(height, width, 81), jnp.float32, sharding=replicated)
    context = jax.ShapeDtypeStruct((2, 512, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("dp")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    coefficients = jax.ShapeDtypeStruct((9,), jnp.float32, sharding=replicated)
    with splash.force_interpret(False):
        exported = jax.export.export(step_fn, platforms=["tpu"])(
            weights, (latents,) * 4, context, coefficients, scalar, scalar
        )
    layers = memory_plan.WAN21_CONFIGS[model]["num_layers"]
    assert exported.mlir_module().count("tpu_custom_call") == layers  # Splash for every self-attention
    assert [aval.shape for aval in exported.out_avals] == [latents.shape] * 4
    assert all(np.dtype(aval.dtype) == np.float32 for aval in exported.out_avals)
