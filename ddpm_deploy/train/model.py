"""eps_theta: a diffusers UNet2DModel built from a plain config dict."""

from __future__ import annotations


def unet_from_config(config: dict):
    from diffusers import UNet2DModel

    return UNet2DModel(**config)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
