"""HunyuanVideo 1.5's transformer forward with static shapes, for ``jax.jit`` through torchax.

diffusers' ``HunyuanVideo15Transformer3DModel.forward`` decides text-to-video by looking at the image
tokens' values (``torch.all(image_embeds == 0)``) and packs each prompt's valid tokens first with boolean
indexing: both need concrete values, which a traced program does not have. This forward calls the same
submodules with the same arithmetic; what changes:

- text-to-video is the family's fact (``image_tokens_valid``), not a test of the values;
- the packing is a scatter to each token's destination (valid tokens first, each group in diffusers'
  order: image, ByT5, Qwen), so the shapes never depend on the prompt. The attention mask it gives is a
  prefix of valid tokens per prompt.

DeepCache (``deepcache``): a "record" forward also returns the outputs of the blocks a cached step skips
(the last block of each run of skipped blocks: what the next computed block, or the output, reads); a
"reuse" forward runs only the blocks in ``always_run`` and takes the skipped runs' outputs from the cache.

Imports torch inside its functions only.
"""

from __future__ import annotations


def skipped_runs(num_blocks: int, always_run: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(first, last), ...] of each run of consecutive blocks a cached step skips."""
    runs, start = [], None
    for index in range(num_blocks):
        if index in always_run:
            if start is not None:
                runs.append((start, index - 1))
                start = None
        elif start is None:
            start = index
    if start is not None:
        runs.append((start, num_blocks - 1))
    return runs


def pack_text_tokens(tokens, masks, zero_invalid):
    """Each batch row's tokens with the valid ones first, both groups in their given order, as diffusers
    packs them. ``tokens``: [B, S_i, D] per group; ``masks``: [B, S_i] bool; ``zero_invalid``: per group,
    whether its invalid tokens are zeroed (the text encoders' are; the image's are kept).
    Returns (packed [B, S, D], mask [B, S] bool: a prefix of True)."""
    import torch

    values = torch.cat([torch.where(mask[..., None], part, torch.zeros_like(part)) if zero else part
                        for part, mask, zero in zip(tokens, masks, zero_invalid)], dim=1)
    mask = torch.cat(list(masks), dim=1)
    valid = mask.long()
    count = valid.sum(dim=1, keepdim=True)
    # Destination of each token: valid ones in order from 0, the others in order after the last valid one.
    destination = torch.where(mask, torch.cumsum(valid, dim=1) - 1, count + torch.cumsum(1 - valid, dim=1) - 1)
    index = destination[..., None].expand(-1, -1, values.shape[-1])
    packed = torch.zeros_like(values).scatter(1, index, values)
    packed_mask = torch.arange(mask.shape[1], device=mask.device)[None, :] < count
    return packed, packed_mask


def forward(module, hidden_states, timestep, text, text_mask, byt5, byt5_mask, image_embeds, *,
            image_tokens_valid: bool, cache_mode: str | None = None, cached=None, always_run=()):
    """The velocity [B, C, T, H, W] (and with ``cache_mode="record"``, the cache: a tuple of (video, text)
    token pairs, one per skipped run). ``module``: diffusers' ``HunyuanVideo15Transformer3DModel``."""
    import torch

    config = module.config
    batch, _, frames, height, width = hidden_states.shape
    p_t, p = config.patch_size_t, config.patch_size
    rotary = module.rope(hidden_states)
    temb = module.time_embed(timestep)
    video = module.x_embedder(hidden_states)

    def typed(tokens, kind: int):  # each stream's learned type embedding (0: Qwen, 1: ByT5, 2: image)
        return tokens + module.cond_type_embed(torch.full(tokens.shape[:2], kind, dtype=torch.long,
                                                          device=tokens.device))

    qwen = typed(module.context_embedder(text, timestep, text_mask), 0)
    glyphs = typed(module.context_embedder_2(byt5), 1)
    image = module.image_embedder(image_embeds)
    image_mask = torch.full(image.shape[:2], image_tokens_valid, dtype=torch.bool, device=image.device)
    image = typed(image if image_tokens_valid else image * 0.0, 2)
    context, context_mask = pack_text_tokens((image, glyphs, qwen), (image_mask, byt5_mask.bool(), text_mask.bool()),
                                             (False, True, True))

    blocks = module.transformer_blocks
    runs = skipped_runs(len(blocks), tuple(always_run)) if cache_mode else []
    run_of_last = {last: number for number, (_, last) in enumerate(runs)}
    skipped = {index for first, last in runs for index in range(first, last + 1)}
    recorded = [None] * len(runs)
    for index, block in enumerate(blocks):
        if cache_mode == "reuse" and index in skipped:
            if index in run_of_last:
                video, context = cached[run_of_last[index]]
            continue
        video, context = block(video, context, temb, context_mask, rotary)
        if cache_mode == "record" and index in run_of_last:
            recorded[run_of_last[index]] = (video, context)

    video = module.proj_out(module.norm_out(video, temb))
    video = video.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
    velocity = video.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)
    if cache_mode == "record":
        return velocity, tuple(recorded)
    return velocity
