"""The joint attention of HunyuanVideo 1.5's double-stream blocks, on the pack's attention dispatch.

diffusers' ``HunyuanVideo15AttnProcessor2_0`` builds a [B, 1, S, S] boolean mask from the prompt tokens'
mask and hands it to SDPA: at 720P and 121 frames that is 113k x 113k per prompt, which no kernel can
take. After ``transformer.pack_text_tokens`` each prompt's valid tokens come first, so the mask is a
prefix: every query attends the video tokens and the first ``n`` text tokens. This processor passes that
length per batch row instead (``key_lengths``), which the Splash kernel takes as data; the arithmetic of
every valid token is diffusers' (a masked query row, an invalid text token, attends the valid keys
instead of none; nothing valid ever reads it).

Imports torch inside its functions only.
"""

from __future__ import annotations


class PrefixMaskedAttention:
    """An attention processor for ``HunyuanVideo15TransformerBlock.attn`` calling ``manager.attention``."""

    def __init__(self, manager):
        self.manager = manager

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        import torch
        from diffusers.models.embeddings import apply_rotary_emb
        from torchax import interop

        def heads(x):  # [B, S, H * D] -> [B, S, H, D]
            return x.unflatten(2, (attn.heads, -1))

        query, key, value = (heads(projection(hidden_states)) for projection in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_q, text_k, text_v = (heads(projection(encoder_hidden_states))
                                  for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        video_tokens = query.shape[1]
        query, key, value = (torch.cat(pair, dim=1).transpose(1, 2)  # [B, H, S, D], torch SDPA's layout
                             for pair in ((query, text_q), (key, text_k), (value, text_v)))
        lengths = video_tokens + attention_mask.to(torch.int32).sum(dim=1)  # [B]: the prefix of valid keys
        manager = self.manager
        out = interop.call_jax(
            lambda q, k, v, n: manager.attention(q, k, v, key_lengths=n, min_key_len=video_tokens),
            query, key, value, lengths)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        video, text = out[:, :video_tokens], out[:, video_tokens:]
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)


def install(module, manager) -> None:
    """Every double-stream block of ``module`` (a ``HunyuanVideo15Transformer3DModel``) attends through
    ``PrefixMaskedAttention``; the token refiner's short self-attention keeps diffusers' processor."""
    for block in module.transformer_blocks:
        block.attn.set_processor(PrefixMaskedAttention(manager))
