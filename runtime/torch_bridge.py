"""The torch bridge: diffusers' and transformers' torch modules run unchanged on jax arrays through
torchax, inside ``jax.jit``; and the block hooks the transformer is traced with (MagCache's residual, the
sequence layout's token split). Model-agnostic: any module with a ``blocks`` list takes the hooks.

Imports torch and jax inside its functions only.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..sharding import TokenSplit


def method_as_forward(module, method):
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


def call_torch_module(manager, module, weights: dict, method: str | Callable, args: tuple,
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
                method_as_forward(module, method), torch_weights, torch_args, kwargs, tie_weights=False
            )
            output = pick(output)
        return env.t2j_iso(output)


@contextlib.contextmanager
def block_cache(module, record: bool, reuse):
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
def split_tokens(manager, module, mesh, split: "TokenSplit | None"):
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


def call_transformer(manager, module, weights: dict, mesh, hidden, timesteps, context, *,
                     record_residual: bool = False, block_residual=None, image_embeds=None,
                     split: "TokenSplit | None" = None):
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
    with manager.active_mesh(mesh, split), split_tokens(manager, module, mesh, split), \
            block_cache(module, record_residual, reuse) as captured:
        return call_torch_module(
            manager, module, weights, "forward", (hidden, timesteps, context), kwargs,
            pick=(lambda output: (output[0], captured["residual"])) if record_residual else (lambda output: output[0]),
        )
