"""PyTorch reference backend: the checkpoint's UNet in eager fp32 (needs torch; imported on construction)."""

from __future__ import annotations

import numpy as np

from ...manifest import make_manifest
from .base import Backend, check_batch


class TorchBackend(Backend):
    def __init__(self, checkpoint: str, device: str = "cpu", max_batch: int = 64, threads: int | None = None,
                 schedule_overrides: dict | None = None):
        import torch

        from ...checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.ckpt = load_checkpoint(checkpoint, schedule_overrides)
        self.torch_device = torch.device("cuda" if device in ("cuda", "tensorrt") else "cpu")
        self.unet = self.ckpt.build_unet().to(self.torch_device)
        self.name = f"torch-{self.torch_device.type}"
        self.max_batch = max_batch
        c = self.ckpt
        self.manifest = make_manifest(
            channels=c.channels, image_size=c.image_size, out_channels=int(c.unet["out_channels"]),
            schedule=c.schedule, variance_type=c.variance_type, clip_sample=c.clip_sample,
            clip_sample_range=c.clip_sample_range, dtype="float32", min_batch=1, max_batch=max_batch,
            source_sha256=c.sha256, source=str(checkpoint), opset=0)

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        import torch

        check_batch(x_t, self.manifest, self.max_batch)
        with torch.inference_mode():
            out = self.unet(torch.from_numpy(x_t).to(self.torch_device), torch.from_numpy(t).to(self.torch_device))
        return out.sample.float().cpu().numpy()
