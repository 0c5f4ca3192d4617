"""PyTorch reference backend: the checkpoint's UNet in eager fp32 (needs torch; imported on construction, so
opening the app's other backends never loads it)."""

from __future__ import annotations

import os

import numpy as np

from ..loop.run import Backend
from ..loop.host import HostSteps
from ..artifact.manifest import Manifest
from ..sampling.noise import WINDOW_BYTES
from .load import load_checkpoint


def idle_cores() -> int:
    """The usable cores other work leaves idle (usable cores - 1-minute load average, rounded), at least 1.
    PyTorch's default, one OpenMP thread per core, spin-waits: on a machine busy with other work its threads fight
    that work for the cores and run several times slower than one thread (eval on the shipped model, 2 images: 57 s
    on 1 thread, still running after 13.5 min on 2, at load average 8.3-8.6 on 2 cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


class TorchBackend(Backend):
    def __init__(self, checkpoint: str, device: str = "cpu", max_batch: int = 64, threads: int | None = None,
                 schedule_overrides: dict | None = None):
        import torch

        super().__init__()
        # None: the idle cores, not torch's one per core (see idle_cores); --threads N overrides
        torch.set_num_threads(threads or min(idle_cores(), torch.get_num_threads()))
        self.ckpt = load_checkpoint(checkpoint, schedule_overrides)
        self.torch_device = torch.device("cuda" if device in ("cuda", "tensorrt") else "cpu")
        self.unet = self.ckpt.build_unet().to(self.torch_device)
        self.name = f"torch-{self.torch_device.type}"
        self.max_batch = max_batch
        self.manifest = Manifest.from_checkpoint(self.ckpt, max_batch=max_batch, source=str(checkpoint))
        self.steps = HostSteps(self._net, self.manifest.image_shape, max_batch, self.name, WINDOW_BYTES)

    def _net(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The UNet's output for float32 x_t (B, C, H, W) at float32 t (B,): the numpy host loop's network."""
        import torch

        with torch.inference_mode():
            out = self.unet(torch.from_numpy(x_t).to(self.torch_device), torch.from_numpy(t).to(self.torch_device))
        return out.sample.float().cpu().numpy()
