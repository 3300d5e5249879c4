"""Build a tiny, randomly initialised Wan diffusers folder of any family, offline.

The folder has the same layout as ``Wan-AI/Wan2.*-Diffusers`` (tokenizer,
text_encoder, transformer(s), vae, scheduler, model_index.json, and for the
CLIP families image_encoder and image_processor) and diffusers' own
``WanPipeline`` / ``WanImageToVideoPipeline.from_pretrained`` loads it. Tests, the ``--tiny`` smoke run
and the benchmarks use it, so nothing is ever downloaded.

``torch``, ``transformers`` and ``diffusers`` are imported inside the functions:
importing this module costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace

logger = logging.getLogger("wan_tpu")

# Words for the tokenizer's training corpus; any prompt made of other words
# still tokenizes (to <unk>), which is all a random model needs.
_CORPUS = (
    "a cat playing piano in a jazz club . a robot dancing in the rain . "
    "cinematic shot of a red fox running through snow , golden hour , 4k . "
    "blurry low quality static worst quality jpeg artifacts ugly deformed . "
    "the quick brown fox jumps over the lazy dog near a river at sunset ."
)


@dataclass(frozen=True)
class TinyWanConfig:
    """Sizes of a tiny Wan model. Defaults keep a CPU test run in seconds.

    ``num_heads`` x ``head_dim`` and ``ffn_dim`` are multiples of 4 and 8 so the
    (2, 4) mesh shards them; ``text_heads`` likewise for the 8-way encoder split.
    """

    num_heads: int = 4
    head_dim: int = 8
    ffn_dim: int = 64
    num_layers: int = 2
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 8
    text_ffn: int = 64
    vocab_size: int = 256
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    text_vocab_size: int = 0  # 0: the tokenizer's; 256384 gives UMT5-XXL's embedding size
    flow_shift: float = 3.0
    seed: int = 0
    dtype: str = "float32"  # "bfloat16" to build the real-size architectures in half the memory
    perturb: bool = True
    extra_transformer: dict = field(default_factory=dict)
    boundary_ratio: float | None = None  # set: a Wan 2.2 A14B-style model with a second (low-noise) expert
    image_to_video: bool = False  # an I2V model: with one expert Wan 2.1 I2V (CLIP), with two Wan 2.2 I2V A14B
    clip_dim: int = 32  # the tiny CLIP vision tower's width (Wan 2.1 I2V)
    ti2v: bool = False  # a Wan 2.2 TI2V 5B-style model: the 48-channel Wan 2.2 VAE (16x), a timestep per token
    first_last_frame: bool = False  # with image_to_video: Wan 2.1 FLF2V-style (two images' CLIP tokens, placed)


# Benchmark configurations (benchmarks/bench.py): "small" is meaningful on a
# 2-core CPU; the others are the real Wan 2.1 architectures with random weights.
# A Wan 2.2 T2V A14B-style tiny model: two experts, switching at 60% of the timesteps.
TINY_A14B = TinyWanConfig(boundary_ratio=0.6)
# Image-to-video: Wan 2.1 I2V-style (a CLIP vision tower, image cross-attention) and Wan 2.2 I2V A14B-style.
TINY_I2V = TinyWanConfig(image_to_video=True)
TINY_I2V_A14B = TinyWanConfig(image_to_video=True, boundary_ratio=0.6)
TINY_TI2V = TinyWanConfig(ti2v=True)  # videos in multiples of 32 pixels (the VAE's 16x, then 2x2 patches)
TINY_FLF2V = TinyWanConfig(image_to_video=True, first_last_frame=True)  # first and last frame given
# --tiny-family names (the command line) -> configs.
TINY_FAMILIES = {"wan2.1-t2v": TinyWanConfig(), "wan2.2-t2v-a14b": TINY_A14B, "wan2.1-i2v": TINY_I2V,
                 "wan2.2-i2v-a14b": TINY_I2V_A14B, "wan2.2-ti2v-5b": TINY_TI2V, "wan2.1-flf2v": TINY_FLF2V}
TINY_CLIP_TOKENS = 17  # the tiny CLIP tower's: (32 / 8)^2 patches and the class token

SMALL = TinyWanConfig(
    num_heads=8, head_dim=64, ffn_dim=2048, num_layers=8, text_dim=256, text_layers=2,
    text_heads=8, text_ffn=512, vocab_size=512, vae_base_dim=32, vae_dim_mult=(1, 2, 2, 2),
)
SMALL_A14B = replace(SMALL, boundary_ratio=0.875)  # Wan 2.2 T2V A14B's switch, on the small sizes
_UMT5_XXL = dict(text_dim=4096, text_layers=24, text_heads=64, text_ffn=10240, text_vocab_size=256384)
_WAN_VAE = dict(vae_base_dim=96, vae_dim_mult=(1, 2, 4, 4))
WAN_1_3B = TinyWanConfig(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30, dtype="bfloat16",
                         perturb=False, **_UMT5_XXL, **_WAN_VAE)
WAN_14B = TinyWanConfig(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40, dtype="bfloat16",
                        perturb=False, **_UMT5_XXL, **_WAN_VAE)


def _train_tokenizer(vocab_size: int):
    """A T5-like tokenizer: pad=0, eos=1, unk=2, and '</s>' appended to every text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_wan(path: str | os.PathLike, config: TinyWanConfig = TinyWanConfig()) -> str:
    """Write a random Wan diffusers folder (Wan 2.1 T2V unless ``config`` says otherwise) to ``path``
    and return it.

    Weights are saved as safetensors. The same ``config`` always gives the same
    weights (seeded), so two builds of one config are interchangeable.
    """
    import torch

    path = os.fspath(path)
    torch.manual_seed(config.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, config.dtype))
    try:
        _build(path, config)
    finally:
        torch.set_default_dtype(default_dtype)
    logger.info("wrote a random Wan model to %s", path)
    return path


def _build(path: str, config: TinyWanConfig) -> None:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    # In this order: each draws from torch's seeded generator, so the same config gives the same weights.
    tokenizer = _train_tokenizer(config.vocab_size)
    text_encoder = _text_encoder(config, len(tokenizer))
    transformer, transformer_2 = _transformers(config)
    experts = {} if transformer_2 is None else {"transformer_2": transformer_2, "boundary_ratio": config.boundary_ratio}
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=_vae(config),
                      scheduler=_scheduler(config), **experts)
    clip = _has_clip(config)
    if config.image_to_video:
        if clip:
            components.update(_tiny_clip(config))
        pipe = WanImageToVideoPipeline(**components)
    else:
        pipe = WanPipeline(**components, expand_timesteps=config.ti2v)
    pipe.save_pretrained(path, safe_serialization=True)
    if clip:  # name the processor as Wan-AI's folders do (without torchvision, transformers 5 made a "...Pil" one)
        edit_json(os.path.join(path, "model_index.json"),
                   lambda index: index.update(image_processor=["transformers", "CLIPImageProcessor"]))
    # transformers 5 names its fast tokenizer "TokenizersBackend", which 4.x
    # cannot load; PreTrainedTokenizerFast reads the same tokenizer.json in both.
    edit_json(os.path.join(path, "tokenizer", "tokenizer_config.json"),
               lambda settings: settings.update(tokenizer_class="PreTrainedTokenizerFast"))


def edit_json(path: str, edit) -> None:
    """Rewrite the JSON file at ``path`` after ``edit(content)`` changed it in place."""
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    edit(content)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)


def _has_clip(config: TinyWanConfig) -> bool:
    return config.image_to_video and config.boundary_ratio is None  # Wan 2.1 I2V and FLF2V; not 2.2 I2V A14B


def _text_encoder(config: TinyWanConfig, tokenizer_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=max(config.vocab_size, tokenizer_size, config.text_vocab_size),
            d_model=config.text_dim,
            d_kv=config.text_dim // config.text_heads,
            d_ff=config.text_ffn,
            num_layers=config.text_layers,
            num_heads=config.text_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()


def _transformers(config: TinyWanConfig):
    """(the transformer, the second expert or None), perturbed: random init leaves some tensors at zero
    (out projections, the modulation table), so parity tests would not compare real arithmetic."""
    from diffusers import WanTransformer3DModel

    image_args = {}
    if _has_clip(config):
        image_args = dict(image_dim=config.clip_dim, added_kv_proj_dim=config.num_heads * config.head_dim)
        if config.first_last_frame:  # a position embedding over both images' CLIP tokens
            image_args["pos_embed_seq_len"] = 2 * TINY_CLIP_TOKENS
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        # I2V: the noisy latents (16) + the first-frame mask (4) + the image's latents (16). TI2V: Wan 2.2's 48.
        in_channels=48 if config.ti2v else 36 if config.image_to_video else 16,
        out_channels=48 if config.ti2v else 16,
        text_dim=config.text_dim,
        freq_dim=256,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
        **image_args,
        **config.extra_transformer,
    ).eval()
    if config.perturb:
        _perturb(transformer)
    transformer_2 = None
    if config.boundary_ratio is not None:  # always perturbed: the two experts must differ
        transformer_2 = _perturb(WanTransformer3DModel.from_config(transformer.config).eval())
    return transformer, transformer_2


def _perturb(module):
    import torch

    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return module


def _vae(config: TinyWanConfig):
    import torch
    from diffusers import AutoencoderKLWan

    if config.ti2v:  # the Wan 2.2 VAE's layout: residual blocks, 2x2 patches folded into 12 channels, 48 latents
        stats = torch.Generator().manual_seed(config.seed)
        return AutoencoderKLWan(
            base_dim=config.vae_base_dim, decoder_base_dim=2 * config.vae_base_dim, z_dim=48,
            dim_mult=list(config.vae_dim_mult), num_res_blocks=1, temperal_downsample=[False, True, True],
            is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
            latents_mean=(torch.randn(48, generator=stats) * 0.1).tolist(),
            latents_std=(torch.rand(48, generator=stats) + 0.5).tolist(),
        ).eval()
    return AutoencoderKLWan(base_dim=config.vae_base_dim, z_dim=16, dim_mult=list(config.vae_dim_mult),
                            num_res_blocks=1, temperal_downsample=[False, True, True]).eval()


def _scheduler(config: TinyWanConfig):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=config.flow_shift)


def _tiny_clip(config: TinyWanConfig) -> dict:
    """A random CLIP vision tower (32x32 images, 8x8 patches: 17 tokens) and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=config.clip_dim, intermediate_size=2 * config.clip_dim, num_hidden_layers=3,
        num_attention_heads=4, image_size=32, patch_size=8, projection_dim=config.clip_dim,
    )).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"image_encoder": encoder, "image_processor": processor}
