"""`ddpm-deploy eval`: bits/dim of a dataset through one or two pipelines (engine and/or PyTorch)."""

from __future__ import annotations

import time

import numpy as np

from ..errors import UserError
from ..sampling.likelihood import bits_per_dim
from ..artifact.manifest import Manifest
from ..progress import Progress
from ..tolerances import EVAL_BPD_AGREEMENT
from ..train.data import BUILTIN_DATASETS, load_dataset
from .verify import check_same_model

# Default number of images: the bound costs T eps calls over all images on each side, so a whole split on a CPU
# takes many minutes; this many images keeps engine + PyTorch near a minute on 2 cores (measured, README).
EVAL_DEFAULT_N = 8


def load_eval_data(data: str, split: str, manifest: Manifest, n: int | None) -> np.ndarray:
    """The dataset in [-1, 1]; built-in digits are resized to the model, user data must already fit it."""
    c, h, w = manifest.image_shape
    x = load_dataset(data, h if data in BUILTIN_DATASETS else None, split=split)
    if x.shape[1:] != (c, h, w):
        raise UserError(f"data {data!r} has images {x.shape[1:]} but the model expects {(c, h, w)}: "
                        "use data of the model's shape")
    if n is not None:
        if n <= 0:
            raise UserError(f"-n must be positive, got {n}")
        x = x[:n]
    return x


def evaluate_pipeline(pipe, x: np.ndarray, seed: int = 0, progress: bool = False) -> dict:
    """`progress`: a bar on a terminal, else a line every 10 % / 30 s on stderr (ddpm_deploy.progress)."""
    m = pipe.manifest
    t0 = time.perf_counter()
    with Progress(f"bound ({pipe.backend.name})", pipe.schedule.T, unit="t", enabled=progress) as bar:
        r = bits_per_dim(pipe.backend.eps_batched, x, pipe.schedule, seed=seed, progress=bar,
                         **m.sampling_options)
    r["seconds"] = time.perf_counter() - t0
    r["backend"] = pipe.backend.name
    r["dtype"] = m.dtype
    return r


def evaluate_pipelines(pipes, *, data: str, split: str, n: int | None, seed: int, echo=print,
                       progress: bool = False) -> dict:
    """`n`: the first n images of the split (None: all of it)."""
    if len(pipes) == 2:
        check_same_model(pipes[0].manifest, pipes[1].manifest)
    if n is not None and n <= 0:
        raise UserError(f"-n must be positive, got {n}")
    x = load_eval_data(data, split, pipes[0].manifest, None)
    total = len(x)
    if n is not None and n < total:
        x = x[:n]
        echo(f"the first {n} of {total} {data}/{split} images (pass --all for the whole split, about "
             f"{-(-total // n)}x as long, or -n N)")
    results = []
    for pipe in pipes:
        r = evaluate_pipeline(pipe, x, seed, progress=progress)
        results.append(r)
        echo(f"{r['backend']} ({r['dtype']}): {r['bits_per_dim']:.4f} bits/dim on {len(x)} {data}/{split} images "
             f"(prior {r['prior_bpd']:.4f}, KL terms {r['kl_terms_bpd']:.4f}, decoder {r['decoder_bpd']:.4f}; "
             f"{r['seconds']:.1f}s)")
    out = {"data": data, "split": split, "images": len(x), "seed": seed,
           "results": [{k: v for k, v in r.items() if k not in ("per_image", "per_t_bpd")} for r in results]}
    if len(results) == 2:
        diff = abs(results[0]["bits_per_dim"] - results[1]["bits_per_dim"])
        fp32 = results[0]["dtype"] == "float32" and "bf16" not in results[0]["backend"]
        ok = diff <= EVAL_BPD_AGREEMENT or not fp32
        out["agreement"] = {"abs_diff_bpd": diff, "tolerance": EVAL_BPD_AGREEMENT if fp32 else None, "ok": ok}
        echo(f"difference {diff:.5f} bits/dim" + (f" (fp32 tolerance {EVAL_BPD_AGREEMENT}: "
                                                  f"{'ok' if ok else 'FAIL'})" if fp32 else " (reduced precision)"))
    return out
