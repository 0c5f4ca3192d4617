"""int8 (export --int8: NNCF W8A8 on OpenVINO) against OpenVINO fp32 on the same model: whole DDIM chains at batch 1,
the ratio measured in one run, and a probe line saying whether this CPU has int8 dot-product instructions.

    python benchmarks/bench_int8.py                                   # shipped digits, DDIM 50, 3 rounds
    python benchmarks/bench_int8.py --int8 digits.int8.xml --onnx digits.onnx --threads 1

Without --int8 / --onnx the shipped model is exported into benchmarks/results/int8/ first (once; the int8 export
calibrates and gates, ~12 min on 2 busy cores). Rounds alternate A B B A ...: each opens both backends once, warms
them up and times `--chains` chains of each; reported: median chain ms of each and int8 / fp32 speed-up (fp32 ms /
int8 ms, median over rounds, with range).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, log, machine  # noqa: E402

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8")


def int8_probe() -> str:
    """One line: whether this CPU has int8 dot-product instructions (VNNI / AMX-int8) that OpenVINO's int8 kernels
    need to beat fp32; without them int8 runs on AVX2 integer multiply-adds (pmaddubsw), often no faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        flags = set()
    have = [f for f in INT8_FLAGS if f in flags]
    try:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a probe: report what is known
        caps = []
    if have:
        return f"int8 probe: this CPU has {', '.join(have)} (OpenVINO CPU capabilities: {', '.join(caps)})"
    return (f"int8 probe: this CPU has no VNNI / AMX-int8 (OpenVINO CPU capabilities: {', '.join(caps)}): int8 runs "
            "on AVX2 integer kernels here, and may be no faster than fp32; the ratio below is what it is")


def chain_ms(pipe, steps: int, chains: int, seed: int) -> list[float]:
    out = []
    for i in range(chains):
        t0 = time.perf_counter()
        pipe.sample(1, seed=seed + i, sampler="ddim", steps=steps, output="float")
        out.append(1000 * (time.perf_counter() - t0))
    return out


def files(args) -> tuple[str, str]:
    if args.int8 and args.onnx:
        return args.int8, args.onnx
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.export.int8 import int8_from_checkpoint

    folder = OUT / "int8"
    folder.mkdir(parents=True, exist_ok=True)
    onnx, xml = folder / "digits.onnx", folder / "digits.int8.xml"
    if not onnx.is_file():
        log("exporting digits (fp32, once)")
        onnx_from_checkpoint("digits", onnx, max_batch=1, echo=lambda *_: None)
    if not xml.is_file():
        log("exporting digits --int8 (once)")
        int8_from_checkpoint("digits", xml, max_batch=1, echo=log)
    return args.int8 or str(xml), args.onnx or str(onnx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--int8", default=None, help="int8 .xml of export --int8 (default: the shipped model's)")
    ap.add_argument("--onnx", default=None, help="the fp32 .onnx of the same model")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from ddpm_deploy.runtime import load

    xml, onnx = files(args)
    print(int8_probe())
    m = machine()
    print(f"machine: {m['cpu']}, {args.threads} thread(s), load average {m['loadavg_1m']}")
    opts = {"threads": args.threads, "cache_dir": ""}
    with load(onnx, backend="openvino", **opts) as fp32, load(xml, **opts) as int8:
        sides = {"fp32": fp32, "int8": int8}
        for pipe in sides.values():
            chain_ms(pipe, args.steps, 1, 99)  # warm-up
        times = {k: [] for k in sides}
        ratios = []
        for r in range(args.rounds):
            order = ["fp32", "int8"] if r % 2 == 0 else ["int8", "fp32"]
            med = {}
            for k in order:
                med[k] = statistics.median(chain_ms(sides[k], args.steps, args.chains, 1000 * r))
                times[k].append(med[k])
            ratios.append(med["fp32"] / med["int8"])
            log(f"round {r + 1}: fp32 {med['fp32']:.1f} ms, int8 {med['int8']:.1f} ms per chain")
    print(f"DDIM {args.steps}, batch 1, whole chain: OpenVINO fp32 {statistics.median(times['fp32']):.1f} ms, "
          f"int8 {statistics.median(times['int8']):.1f} ms; int8 speed-up {statistics.median(ratios):.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); load average now {machine()['loadavg_1m']}")


if __name__ == "__main__":
    main()
