"""The Wan models' published configs, by name, and the constants every family shares.

What the HBM plan, the compile command and the tests build the modules from when nothing is downloaded:
the transformers of every supported family (Wan 2.1 T2V 1.3B and 14B, Wan 2.1 I2V 14B, Wan 2.2 T2V and
I2V A14B, Wan 2.2 TI2V 5B), the UMT5-XXL text encoder, the CLIP image encoder, both VAEs, and the repo
ids the loader knows. Keys are as the diffusers / transformers classes take them (config.json).

Imports numpy only (through ``latents``).
"""

from __future__ import annotations

from typing import Mapping

from . import latents

TEXT_TOKENS = 512  # every prompt is padded to it (diffusers' WanPipeline default; the original pack used 226)
CLIP_TOKENS = 257  # ViT-H/14 at 224x224: 16x16 patches and the class token (Wan 2.1 I2V's image tokens)

# The published Wan 2.1 T2V diffusers configs (transformer/config.json of
# Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers), keys as WanTransformer3DModel takes them.
_WAN21_COMMON = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Every family's transformer, by name (the name is historical: Wan 2.2's are here too).
WAN21_CONFIGS: dict[str, dict] = {
    "1.3B": dict(_WAN21_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(_WAN21_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
# The other families' transformers (transformer/config.json): image-to-video takes the first-frame mask and
# latents beside the noise (36 input channels); Wan 2.1 I2V also attends to 257 CLIP tokens (1280 wide).
# Wan 2.2 A14B has two such transformers (experts), both resident.
WAN21_CONFIGS["14B-I2V"] = dict(WAN21_CONFIGS["14B"], in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN21_CONFIGS["A14B"] = dict(WAN21_CONFIGS["14B"])
WAN21_CONFIGS["A14B-I2V"] = dict(WAN21_CONFIGS["14B"], in_channels=36)
# Wan 2.2 TI2V 5B: 48 latent channels (the Wan 2.2 VAE), a timestep per token.
WAN21_CONFIGS["5B"] = dict(_WAN21_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                           out_channels=48)
MODEL_EXPERTS = {"A14B": 2, "A14B-I2V": 2}  # transformers resident at once (Wan 2.2 A14B's two experts)
# Repo ids the loader knows, to the configs above.
MODEL_ALIASES = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "1.3B",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "14B",
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": "14B-I2V",
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": "14B-I2V",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "A14B",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": "A14B-I2V",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "5B",
}
# Wan 2.1 I2V's image_encoder/config.json (CLIP ViT-H/14 vision tower), keys as CLIPVisionConfig takes them.
CLIP_VIT_H_CONFIG: dict = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
# UMT5-XXL encoder (text_encoder/config.json), shared by every family.
UMT5_XXL_CONFIG: dict = dict(
    d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
# AutoencoderKLWan defaults, which are the Wan 2.1 VAE (vae/config.json).
WAN21_VAE_CONFIG: dict = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
)
# The Wan 2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json): 48 latents, 2x2 patches, 16x in all.
WAN22_VAE_CONFIG: dict = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
)


def clean_config(config: Mapping) -> dict:
    """A config.json without its bookkeeping ("_class_name", "_diffusers_version", ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def vae_config_for(transformer_config: Mapping) -> dict:
    """The VAE a transformer works with (``latents.LatentGeometry.from_transformer_config``): the Wan 2.2
    VAE for its latents, else Wan 2.1's."""
    geometry = latents.LatentGeometry.from_transformer_config(transformer_config)
    return dict(WAN22_VAE_CONFIG if geometry.channels == latents.WAN22.channels else WAN21_VAE_CONFIG)


def resolve_model(model: str | Mapping) -> tuple[str, dict]:
    """(label, transformer config) from a name ("14B", "1.3B", ...), a known repo id, or a config dict."""
    if isinstance(model, Mapping):
        config = clean_config(model)
        for name, known in WAN21_CONFIGS.items():
            if all(config.get(k) == known[k] for k in ("num_attention_heads", "ffn_dim", "num_layers")) and \
                    config.get("in_channels", 16) == known.get("in_channels", 16):
                return name, config
        return f"{config['num_attention_heads']}x{config['attention_head_dim']}x{config['num_layers']}", config
    name = MODEL_ALIASES.get(model, model)
    if name not in WAN21_CONFIGS:
        raise ValueError(
            f"model={model!r}: use one of {sorted(WAN21_CONFIGS)}, a known repo id, or a transformer config dict"
        )
    return name, dict(WAN21_CONFIGS[name])
