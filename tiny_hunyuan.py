"""Build a tiny, randomly initialised HunyuanVideo 1.5 diffusers folder (text- or image-to-video), offline.

The folder has the layout of ``hunyuanvideo-community/HunyuanVideo-1.5-*`` (transformer, vae, scheduler,
guider, text_encoder (Qwen2.5-VL's text model) and tokenizer, text_encoder_2 (ByT5) and tokenizer_2, and
for image-to-video image_encoder (SigLIP) and feature_extractor), and diffusers' own
``HunyuanVideo15Pipeline`` / ``HunyuanVideo15ImageToVideoPipeline.from_pretrained`` loads it. The tests
use it, so nothing is ever downloaded.

``torch``, ``transformers`` and ``diffusers`` are imported inside the functions: importing this module
costs nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("wan_tpu")

# The Qwen tokenizer's training corpus: diffusers' system prompt and a few prompts; other words still
# tokenize (byte-level BPE), which is all a random model needs.
_CORPUS = (
    "You are a helpful assistant. Describe the video by detailing the following aspects: "
    "1. The main content and theme of the video. 2. The color, shape, size, texture, quantity, text, and "
    "spatial relationships of the objects. 3. Actions, events, behaviors temporal relationships, physical "
    "movement changes of the objects. 4. background environment, light, style and atmosphere. 5. camera "
    "angles, movements, and transitions used in the video. a cat playing piano in a jazz club. a sign that "
    "says \"OPEN\". blurry low quality static worst quality."
)

# Qwen2.5's chat format, enough of it for diffusers' apply_chat_template(add_generation_prompt=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyHunyuanConfig:
    """Sizes of a tiny HunyuanVideo 1.5 model; multiples of 4 and 8 so the (2, 4) mesh shards them.

    The VAE compresses 4x in space and 2x in time (the real one: 16x and 4x) to keep CPU runs short;
    the pack reads the factors from its config, so nothing assumes the real ones.
    """

    num_heads: int = 4
    head_dim: int = 8
    num_layers: int = 2
    latent_channels: int = 4
    text_dim: int = 32  # the Qwen text model's width
    text_heads: int = 4
    byt5_dim: int = 32
    image_dim: int = 16  # SigLIP's width
    image_to_video: bool = False
    target_size: int = 32  # pixels: the image-to-video size bucket (diffusers' calculate_default_height_width)
    shift: float = 7.0
    guidance_scale: float = 6.0
    seed: int = 0


TINY_T2V = TinyHunyuanConfig()
TINY_I2V = TinyHunyuanConfig(image_to_video=True)
TINY_HUNYUAN_FAMILIES = {"hunyuanvideo1.5-t2v": TINY_T2V, "hunyuanvideo1.5-i2v": TINY_I2V}


def build_tiny_hunyuan(path: str | os.PathLike, config: TinyHunyuanConfig = TINY_T2V) -> str:
    """Write a random HunyuanVideo 1.5 diffusers folder to ``path`` and return it. The same ``config``
    always gives the same weights (seeded)."""
    import torch
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

    from .tiny_wan import edit_json

    path = os.fspath(path)
    torch.manual_seed(config.seed)
    components = dict(transformer=_transformer(config), vae=_vae(config), scheduler=_scheduler(config),
                      guider=_guider(config), **_text_encoders(config))
    if config.image_to_video:
        components.update(_image_encoder(config))
        pipe = HunyuanVideo15ImageToVideoPipeline(**components)
    else:
        pipe = HunyuanVideo15Pipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers 5 names its fast tokenizer "TokenizersBackend", which 4.x cannot load.
    edit_json(os.path.join(path, "tokenizer", "tokenizer_config.json"),
               lambda settings: settings.update(tokenizer_class="Qwen2TokenizerFast"))
    logger.info("wrote a random HunyuanVideo 1.5 model to %s", path)
    return path


def _perturb(module):
    """Random init leaves some tensors at zero (out projections, modulation): move every weight a little,
    so parity compares real arithmetic."""
    import torch

    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return module.eval()


def _transformer(config: TinyHunyuanConfig):
    from diffusers import HunyuanVideo15Transformer3DModel

    rope = (2, 2, config.head_dim - 4)  # the three rotary axes (frames, height, width) fill a head
    return _perturb(HunyuanVideo15Transformer3DModel(
        in_channels=2 * config.latent_channels + 1, out_channels=config.latent_channels,
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, num_layers=config.num_layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=config.text_dim,
        text_embed_2_dim=config.byt5_dim, image_embed_dim=config.image_dim, rope_axes_dim=rope,
        target_size=config.target_size, task_type="i2v" if config.image_to_video else "t2v",
    ))


def _vae(config: TinyHunyuanConfig):
    from diffusers import AutoencoderKLHunyuanVideo15

    return _perturb(AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels, block_out_channels=(16, 16),
        layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
        downsample_match_channel=False, upsample_match_channel=False,
    ))


def _scheduler(config: TinyHunyuanConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=config.shift)


def _guider(config: TinyHunyuanConfig):
    from diffusers.guiders import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=config.guidance_scale)


def _qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                              unk_token=None, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_encoders(config: TinyHunyuanConfig) -> dict:
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = _qwen_tokenizer()
    head_dim = config.text_dim // config.text_heads
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_dim, intermediate_size=2 * config.text_dim,
        num_hidden_layers=3, num_attention_heads=config.text_heads, num_key_value_heads=config.text_heads,
        rope_scaling={"mrope_section": [1, 1, head_dim // 2 - 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0, bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    ))
    tokenizer_2 = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=config.byt5_dim, d_kv=8, d_ff=2 * config.byt5_dim, num_layers=2,
        num_heads=config.byt5_dim // 8, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    return {"text_encoder": _perturb(qwen), "tokenizer": tokenizer, "text_encoder_2": _perturb(byt5),
            "tokenizer_2": tokenizer_2}


def _image_encoder(config: TinyHunyuanConfig) -> dict:
    """A random SigLIP vision tower (32x32 images, 8x8 patches: 16 tokens) and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=config.image_dim, intermediate_size=2 * config.image_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=8,
    ))
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    return {"image_encoder": _perturb(encoder), "feature_extractor": processor}
