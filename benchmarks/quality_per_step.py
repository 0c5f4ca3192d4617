"""Quality per step budget on the shipped digits model (README's sampler table; bounded: a few CPU minutes).

For each sampler x steps: n images from fixed seeds on onnxruntime CPU (one thread), the Fréchet distance on PCA
features to the held-out digits (ddpm_deploy.app.quality), and wall time per image. Run:

    .venv/bin/python benchmarks/quality_per_step.py --onnx /tmp/digits.onnx -n 200 --json benchmarks/results/quality.json

(export first: `ddpm-deploy export digits -o /tmp/digits.onnx --max-batch 200`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

CONFIGS = [("ddpm", None, [1000])] + [(s, o, [5, 10, 20, 50]) for s, o in
                                      (("ddim", None), ("dpmpp", 2), ("dpmpp", 3), ("unipc", 2), ("dpmpp_sde", 2))]


def main() -> None:
    from ddpm_deploy.files import write_bytes_atomic
    from ddpm_deploy.app.quality import PCAFeatures, frechet_distance, real_floor
    from ddpm_deploy.runtime import load
    from ddpm_deploy.train.data import load_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="Comma-separated samplers to run (default: all of CONFIGS).")
    args = ap.parse_args()
    train, test = load_dataset("digits", 16, "train"), load_dataset("digits", 16, "test")
    feats = PCAFeatures.fit(train)
    f_test = feats(test)
    floor, floor_sd = real_floor(feats, train, test, args.n)
    print(f"PCA {feats.components.shape[0]} components ({feats.explained:.1%} of train variance); real-vs-real floor "
          f"at n={args.n}: {floor:.2f} ± {floor_sd:.2f}")
    rows = []
    with load(args.onnx, backend="onnxruntime", threads=args.threads) as pipe:
        pipe.sample(2, seed=0, sampler="ddim", steps=5)  # warm-up
        for sampler, order, step_list in CONFIGS:
            if args.only and sampler not in args.only.split(","):
                continue
            for steps in step_list:
                t0 = time.perf_counter()
                x0 = pipe.sample(args.n, seed=0, sampler=sampler, steps=steps, order=order, output="float")
                sec = time.perf_counter() - t0
                fd = frechet_distance(feats(np.clip(x0, -1, 1)), f_test)
                rows.append({"sampler": sampler, "order": order, "steps": steps, "fd": fd,
                             "ms_per_image": 1000 * sec / args.n})
                print(f"{sampler}{'' if order is None else f' order {order}'} {steps:4d} steps: FD {fd:7.2f}, "
                      f"{1000 * sec / args.n:7.2f} ms/image", flush=True)
    out = {"n": args.n, "threads": args.threads, "pca_components": int(feats.components.shape[0]),
           "pca_explained": feats.explained, "real_floor": floor, "real_floor_sd": floor_sd, "rows": rows}
    if args.json:
        write_bytes_atomic(json.dumps(out, indent=2).encode(), args.json)


if __name__ == "__main__":
    main()
