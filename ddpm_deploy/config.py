"""Model presets and the checkpoint's config vocabulary (plain JSON-able dicts, numpy-free)."""

from __future__ import annotations

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
# What the network outputs (diffusers' names): eps (Ho et al.), v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022),
# or x_0 itself.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers UNet2DModel keyword arguments. `sample_size`/`in_channels`/`out_channels` are filled from the data.
UNET_PRESETS: dict[str, dict] = {
    # Fast tests: 8x8, two levels, one attention block so the attention path is exercised everywhere.
    "tiny": {
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    },
    # The shipped digits model: 16x16, attention at 8x8.
    "small": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    # The google/ddpm-cifar10-32 architecture (35.7 M parameters at 3x32x32).
    "cifar10": {
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "attention_head_dim": None,
    },
}


def unet_config(preset: str, *, sample_size: int, channels: int, learned_variance: bool = False,
                overrides: dict | None = None) -> dict:
    """UNet2DModel kwargs for a preset, sized for the data; learned variance doubles the output channels."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(UNET_PRESETS)}")
    cfg = dict(UNET_PRESETS[preset])
    cfg.update(overrides or {})
    cfg.update(sample_size=int(sample_size), in_channels=int(channels),
               out_channels=int(channels) * (2 if learned_variance else 1))
    return cfg
