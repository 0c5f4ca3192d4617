"""Images out: float [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C) -> a PNG grid, written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .files import check_output_path, write_bytes_atomic


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    assert x.ndim == 4, x.shape
    return np.clip((x.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), after clipping to that range."""
    mse = float(np.mean((np.clip(a, -1, 1).astype(np.float64) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (H', W', C) image."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    out = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, C) uint8 image atomically."""
    from PIL import Image

    path = check_output_path(path)
    buf = io.BytesIO()
    arr = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes_atomic(buf.getvalue(), path)
    return path


def save_grid(images: np.ndarray, path: str | Path, scale: int | None = None) -> Path:
    """Save uint8 (N, H, W, C) images as a grid; small images are scaled up so the PNG is viewable."""
    scale = scale or max(1, 64 // images.shape[1])
    return save_png(grid(images, scale=scale), path)
