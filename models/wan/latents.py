"""Wan's latent geometry, defined once: how a video of height x width x frames maps to VAE latents and
transformer tokens, which sizes a model can make, and the latents' normalisation.

Two VAEs exist: Wan 2.1's (16 channels, 8x spatially) and Wan 2.2's (48 channels, 16x, TI2V 5B's). Both
compress time 4x (4n+1 frames), and the transformer patches 1x2x2 on top. Everything else in the pack
asks a ``LatentGeometry`` rather than repeating this arithmetic.

Imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

TEMPORAL_FACTOR = 4  # both Wan VAEs: 4n+1 frames -> n+1 latent frames


@dataclass(frozen=True)
class LatentGeometry:
    """A Wan VAE's latent format and the transformer's patching."""

    channels: int = 16
    spatial_factor: int = 8
    patch: tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_vae_config(cls, config: Mapping) -> "LatentGeometry":
        """From vae/config.json (nothing loaded). Refuses a VAE that does not compress time 4x."""
        temporal = config.get("scale_factor_temporal", TEMPORAL_FACTOR)
        if temporal != TEMPORAL_FACTOR:
            raise ValueError(f"VAE scale_factor_temporal={temporal}: Wan's VAEs compress time 4x; this is not "
                             f"a Wan VAE")
        return cls(int(config.get("z_dim", 16)), int(config.get("scale_factor_spatial", 8)))

    @classmethod
    def from_transformer_config(cls, config: Mapping) -> "LatentGeometry":
        """The VAE a transformer was trained with, from its config alone: 48 output channels are Wan 2.2's
        VAE (TI2V 5B), 16 Wan 2.1's."""
        channels = int(config.get("out_channels", 16))
        return cls(channels, 16 if channels == WAN22.channels else 8, tuple(config.get("patch_size", (1, 2, 2))))

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's downsampling, then the 2x2 patches."""
        return self.spatial_factor * self.patch[1]

    def video_size_error(self, height, width, num_frames) -> str | None:
        """Why this model cannot make a video of this size, naming sizes it can; None when it can."""
        multiple = self.pixel_multiple
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
                lower = max(multiple, int(value) // multiple * multiple) if isinstance(value, (int, np.integer)) \
                    else 480
                return (f"{name}={value}: Wan needs a multiple of {multiple} ({lower} or {lower + multiple}): this "
                        f"model's VAE downsamples {self.spatial_factor}x and the transformer patches 2x2")
        if num_frames is not None and (not isinstance(num_frames, (int, np.integer)) or num_frames < 1
                                       or (num_frames - 1) % TEMPORAL_FACTOR):
            lower = max(1, (int(num_frames) - 1) // 4 * 4 + 1) if isinstance(num_frames, (int, np.integer)) else 81
            return f"num_frames={num_frames}: Wan needs 4n+1 frames ({lower} or {lower + 4})"
        return None

    def check_video(self, height, width, num_frames) -> None:
        """Raise ValueError unless this model can make a video of this size."""
        error = self.video_size_error(height, width, num_frames)
        if error:
            raise ValueError(error)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // TEMPORAL_FACTOR + 1

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        """The VAE latents of one video: [1, channels, frames, height, width]."""
        return (1, self.channels, self.latent_frames(num_frames), height // self.spatial_factor,
                width // self.spatial_factor)

    def video_size(self, latent_shape) -> tuple[int, int, int]:
        """(height, width, num_frames) of the video whose latents have ``latent_shape`` [..., T, h, w]."""
        frames, height, width = latent_shape[-3:]
        return height * self.spatial_factor, width * self.spatial_factor, (frames - 1) * TEMPORAL_FACTOR + 1

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """The transformer's sequence length for one video."""
        p_t, p_h, p_w = self.patch
        _, _, frames, h, w = self.latent_shape(height, width, num_frames)
        return (frames // p_t) * (h // p_h) * (w // p_w)


WAN21 = LatentGeometry(16, 8)  # Wan 2.1's VAE (also Wan 2.2 A14B's)
WAN22 = LatentGeometry(48, 16)  # Wan 2.2's VAE (TI2V 5B)


def normalise(latents: np.ndarray, latents_mean, latents_std) -> np.ndarray:
    """From the VAE's space to the transformer's (what the VAE encoder's means become)."""
    shape = (1, -1, 1, 1, 1)
    mean, std = np.asarray(latents_mean, np.float32), np.asarray(latents_std, np.float32)
    return ((latents - mean.reshape(shape)) * (1.0 / std).reshape(shape)).astype(np.float32)


def to_vae_latents(latents: np.ndarray, latents_mean, latents_std) -> np.ndarray:
    """From the transformer's normalised latents to the VAE's own space.

    The one place the pack applies Wan's latents_mean/std on the way out: what ``denoise`` returns, what
    ComfyUI's LATENT holds and what ``decode`` takes are all in the VAE's space.
    """
    shape = (1, -1, 1, 1, 1)
    mean, std = np.asarray(latents_mean, np.float32), np.asarray(latents_std, np.float32)
    return (latents * std.reshape(shape) + mean.reshape(shape)).astype(np.float32)
