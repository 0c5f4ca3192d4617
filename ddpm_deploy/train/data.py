"""Training data: scikit-learn's digits, a folder of images, or an .npz array, as float32 (N, C, H, W) in [-1, 1]."""
# scikit-learn (the torch extra: the digits) and PIL (image folders) are imported by the loader that needs them.

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BUILTIN_DATASETS = ("digits",)


def load_dataset(spec: str, image_size: int | None = None, split: str = "train") -> np.ndarray:
    """Resolve `spec` (a built-in name, a folder or an .npz file) to images in [-1, 1]."""
    path = Path(spec)
    if spec in BUILTIN_DATASETS and not path.exists():
        x01 = _digits(split)
        image_size = image_size or 16
    elif path.is_dir():
        x01 = _image_folder(path)
    elif path.suffix == ".npz" and path.is_file():
        x01 = _npz(path)
    elif path.exists():
        raise UserError(f"cannot read data {spec!r}: expected a folder of PNG/JPEG images or an .npz file")
    else:
        raise UserError(f"unknown dataset {spec!r}: use one of {', '.join(BUILTIN_DATASETS)}, "
                        "a folder of PNG/JPEG images, or an .npz file")
    if image_size and x01.shape[-1] != image_size:
        x01 = _resize(x01, image_size)
    return (x01 * 2.0 - 1.0).astype(np.float32)


def _digits(split: str) -> np.ndarray:
    """sklearn's 1797 8x8 digits (values 0..16). 'test' is a fixed 20% held out; 'train' the rest; 'all' both."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float64) / 16.0
    n_test = len(images) // 5
    order = np.random.default_rng(0).permutation(len(images))  # fixed split, independent of any seed flag
    chosen = {"train": order[n_test:], "test": order[:n_test], "all": order}.get(split)
    if chosen is None:
        raise UserError(f"unknown split {split!r}: use train, test or all")
    return images[np.sort(chosen)][:, None].astype(np.float32)


def _image_folder(folder: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no PNG/JPEG images in {folder}: put .png/.jpg files directly in the folder")
    images, modes = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {f}: {e}") from None
        modes.add(images[-1].mode)
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise UserError(f"images in {folder} have mixed sizes {sorted(sizes)[:4]}: resize them to one size first")
    mode = "L" if modes <= {"L", "1"} else "RGB"
    arr = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images])
    return arr[:, None] if mode == "L" else arr.transpose(0, 3, 1, 2)


def _npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle untrusted data
            keys = list(z.keys())
            key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise UserError(f"{path} holds arrays {keys}: name the image array 'images'")
            arr = z[key]
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as an .npz array file: {e}") from None
    return _normalize_array(arr, path)


def _normalize_array(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[2] != arr.shape[3]:
        raise UserError(f"{path}: expected square images shaped (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1 or 3, "
                        f"got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise UserError(f"{path}: float images must lie in [0, 1] (or use uint8 0..255)")
    return arr


def _resize(x01: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize per channel in float, clipped back to [0, 1]."""
    from PIL import Image

    out = np.empty(x01.shape[:2] + (size, size), dtype=np.float32)
    for i, img in enumerate(x01):
        for c, plane in enumerate(img):
            out[i, c] = np.asarray(Image.fromarray(plane, mode="F").resize((size, size), Image.BICUBIC))
    return np.clip(out, 0.0, 1.0)
