"""PyTorch reference backend: the checkpoint's UNet in eager fp32 (needs torch; imported on construction)."""

from __future__ import annotations

import numpy as np

from ..chain import Backend, check_batch
from ..manifest import Manifest


class TorchBackend(Backend):
    def __init__(self, checkpoint: str, device: str = "cpu", max_batch: int = 64, threads: int | None = None,
                 schedule_overrides: dict | None = None):
        import torch

        from .load import load_checkpoint

        super().__init__()
        if threads:
            torch.set_num_threads(threads)
        self.ckpt = load_checkpoint(checkpoint, schedule_overrides)
        self.torch_device = torch.device("cuda" if device in ("cuda", "tensorrt") else "cpu")
        self.unet = self.ckpt.build_unet().to(self.torch_device)
        self.name = f"torch-{self.torch_device.type}"
        self.max_batch = max_batch
        self.manifest = Manifest.from_checkpoint(self.ckpt, max_batch=max_batch, source=str(checkpoint))

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        import torch

        check_batch(x_t, self.manifest, self.max_batch)
        with torch.inference_mode():
            out = self.unet(torch.from_numpy(x_t).to(self.torch_device), torch.from_numpy(t).to(self.torch_device))
        return out.sample.float().cpu().numpy()
