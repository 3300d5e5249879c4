"""Wan's attention processor for TPU: diffusers' ``WanAttnProcessor`` with the rotary embedding written
without a strided scatter.

diffusers applies the rotary embedding as

    out = torch.empty_like(x)                 # bf16
    out[..., 0::2] = x1 * cos - x2 * sin      # fp32 values written into bf16 at every other lane
    out[..., 1::2] = x1 * sin + x2 * cos

which XLA compiles into two scatters per tensor on fp32 copies of q and k (libtpu's cycle model cannot
even price them at the step's sizes: ``benchmarks/step_cycles.py``). Here the two halves are stacked on a
new last axis and flattened back: the same fp32 products, each rounded to the tensor's dtype once, in the
same lane order, so the result is bit-identical, and XLA fuses it into one elementwise pass.

Everything else is diffusers' processor as is (projections, the q/k RMS norms, image context, the
attention dispatch the pack overrides). ``install(transformer)`` sets it on every ``WanAttention`` of a
Wan transformer; the loaders call it (``loading.load_transformer``, ``models.wan.modules.meta_module``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("wan_tpu.attention_processor")


def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
    """diffusers' Wan rotary embedding, [B, S, H, D] with (cos, sin) [.., D] repeated per pair: without the
    scatter. x1, x2 are the even and odd lanes; the output's even lanes are x1 cos - x2 sin, its odd ones
    x1 sin + x2 cos."""
    import torch

    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    even = (x1 * cos - x2 * sin).to(hidden_states.dtype)
    odd = (x1 * sin + x2 * cos).to(hidden_states.dtype)
    return torch.stack((even, odd), dim=-1).flatten(-2)


def processor_class():
    """``WanTPUAttnProcessor`` (built on first use: diffusers is imported lazily)."""
    global _PROCESSOR
    if _PROCESSOR is not None:
        return _PROCESSOR
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers import transformer_wan

    class WanTPUAttnProcessor(transformer_wan.WanAttnProcessor):
        """``WanAttnProcessor`` with ``apply_rotary_emb`` above (see the module's docstring)."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            encoder_hidden_states_img = None
            if attn.add_k_proj is not None:
                # 512 is the context length of the text encoder, as diffusers has it
                image_context_length = encoder_hidden_states.shape[1] - 512
                encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
                encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

            query, key, value = transformer_wan._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            query = attn.norm_q(query)
            key = attn.norm_k(key)
            query = query.unflatten(2, (attn.heads, -1))
            key = key.unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                query = apply_rotary_emb(query, *rotary_emb)
                key = apply_rotary_emb(key, *rotary_emb)

            hidden_states_img = None
            if encoder_hidden_states_img is not None:
                key_img, value_img = transformer_wan._get_added_kv_projections(attn, encoder_hidden_states_img)
                key_img = attn.norm_added_k(key_img)
                key_img = key_img.unflatten(2, (attn.heads, -1))
                value_img = value_img.unflatten(2, (attn.heads, -1))
                hidden_states_img = dispatch_attention_fn(
                    query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                    backend=self._attention_backend, parallel_config=None)
                hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend,
                parallel_config=(self._parallel_config if encoder_hidden_states is None else None))
            hidden_states = hidden_states.flatten(2, 3).type_as(query)
            if hidden_states_img is not None:
                hidden_states = hidden_states + hidden_states_img
            hidden_states = attn.to_out[0](hidden_states)
            return attn.to_out[1](hidden_states)

    _PROCESSOR = WanTPUAttnProcessor
    return _PROCESSOR


_PROCESSOR = None


def install(transformer) -> int:
    """Set ``WanTPUAttnProcessor`` on every ``WanAttention`` of ``transformer`` that runs diffusers' own Wan
    processor (a module without them, e.g. another family's, is left alone). Returns how many were set."""
    try:
        from diffusers.models.transformers import transformer_wan
    except ImportError:  # a diffusers without Wan: nothing to replace
        return 0
    cls = processor_class()
    count = 0
    for module in transformer.modules():
        if isinstance(module, transformer_wan.WanAttention) and type(module.processor) is transformer_wan.WanAttnProcessor:
            module.set_processor(cls())
            count += 1
    if count:
        logger.debug("Wan TPU attention processor on %d attention modules", count)
    return count
