"""eps_theta: a diffusers UNet2DModel built from a plain config dict."""
# diffusers (the torch extra) is imported where used: importing ddpm_deploy.nn needs no torch.

from __future__ import annotations


def unet_from_config(config: dict):
    from diffusers import UNet2DModel

    # from_config ignores keys that other diffusers versions wrote (with a log line), unlike UNet2DModel(**config).
    return UNet2DModel.from_config(dict(config))
