"""The torch side of eps_theta: checkpoints (ddpm-deploy model.pt, diffusers folders, shipped models), the diffusers
UNet2DModel, the PyTorch reference backend and the paper's reference sampler. Importing it needs no torch; the
functions that build or run the network import torch themselves."""

from __future__ import annotations

from .checkpoint import Checkpoint
from .load import SHIPPED_MODELS, load_checkpoint, resolve_checkpoint_path

__all__ = ["Checkpoint", "SHIPPED_MODELS", "load_checkpoint", "resolve_checkpoint_path"]
