"""Encoder preprocessing overhead: uint8 patches → features vs the bare forward, side by side.

For each encoder (random weights, CPU), on the same pre-loaded batch:
  bare      forward(x) on an already preprocessed float batch (the ceiling)
  prep      forward(preprocess(uint8 at the input size))         target ≥ 0.95 of bare
  prep+rs   forward(preprocess(uint8 at 256 px, resized))        target ≥ 0.90 of bare
Timings alternate between the three variants and report medians, so machine load hits
all of them alike; targets apply to the real encoders (tiny test models print n/a). Also printed: parameters, forward GFLOPs per patch (counted on the
meta device) and the H100 throughput those FLOPs imply (not measured).

    python bench/encoders.py --quick
    python bench/encoders.py --encoders ctranspath,resnet50-trunc --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from models.encoders import count_parameters, create_encoder, flops_per_patch

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak
ASSUMED_MFU = 0.4  # typical model-FLOPs utilisation of ViT/Swin inference at large batch


CLOCK = time.perf_counter


def _time(fn, reps: int) -> float:
    start = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - start) / reps


def _reps_for(fn, min_seconds: float) -> int:
    """Calls per measurement so that one lasts at least ``min_seconds`` (tiny models are fast)."""
    once = _time(fn, 1)
    return max(1, int(min_seconds / max(once, 1e-6)))


def bench_encoder(name: str, batch: int, rounds: int, resize_from: int, min_seconds: float) -> dict:
    enc = create_encoder(name, weights="random", device="cpu")
    size = enc.input_size
    gen = torch.Generator().manual_seed(0)
    native = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    bigger = torch.randint(
        0, 256, (batch, resize_from, resize_from, 3), dtype=torch.uint8, generator=gen
    )
    ready = enc.preprocess(native)
    variants = {
        "bare": lambda: enc(ready),
        "prep": lambda: enc(enc.preprocess(native)),
        "prep+rs": lambda: enc(enc.preprocess(bigger)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        reps = _reps_for(variants["bare"], min_seconds)
        for _ in range(rounds):
            for key, fn in variants.items():
                times[key].append(_time(fn, reps))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = flops_per_patch(name)
    return {
        "name": name,
        "params": count_parameters(enc.trunk),
        "gflops": flops / 1e9,
        "bare": batch / med["bare"],
        "prep": batch / med["prep"],
        "prep+rs": batch / med["prep+rs"],
        "h100": H100_BF16_DENSE_TFLOPS * 1e12 * ASSUMED_MFU / flops,
        "size": size,
        "test_only": enc.spec.test_only,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few rounds, 2 encoders")
    parser.add_argument("--encoders", default=None, help="comma-separated encoder names")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--resize-from", type=int, default=256, help="patch px for the resize case")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--min-seconds", type=float, default=None, help="minimum duration of one measurement"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (fairer on a shared, loaded machine)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (
        args.encoders.split(",")
        if args.encoders
        else (
            ["tiny-vit", "ctranspath"]
            if args.quick
            else ["tiny-vit", "tiny-swin", "tiny-resnet", "ctranspath", "resnet50-trunc"]
        )
    )
    batch = args.batch_size or (8 if args.quick else 32)
    rounds = args.rounds or (3 if args.quick else 7)
    min_seconds = args.min_seconds or (0.3 if args.quick else 1.0)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | cores: {os.cpu_count()} "
        f"| torch threads: {torch.get_num_threads()} | torch {torch.__version__} | "
        f"batch {batch} | rounds {rounds} (median) | clock {args.clock} | "
        f"load {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'encoder':<16}{'params':>13}{'GFLOP/p':>9}{'bare p/s':>10}{'prep p/s':>10}"
        f"{'ratio':>7}{'(≥0.95)':>8}{'rs p/s':>9}{'ratio':>7}{'(≥0.90)':>8}{'H100 p/s*':>13}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        r = bench_encoder(name, batch, rounds, args.resize_from, min_seconds)
        ratio, ratio_rs = r["prep"] / r["bare"], r["prep+rs"] / r["bare"]
        verdict, verdict_rs = (
            ("n/a", "n/a")  # tiny test models: preprocessing rivals their forward
            if r["test_only"]
            else ("ok" if ratio >= 0.95 else "MISS", "ok" if ratio_rs >= 0.90 else "MISS")
        )
        print(
            f"{r['name']:<16}{r['params']:>13,}{r['gflops']:>9.2f}{r['bare']:>10.1f}"
            f"{r['prep']:>10.1f}{ratio:>7.2f}{verdict:>8}"
            f"{r['prep+rs']:>9.1f}{ratio_rs:>7.2f}{verdict_rs:>8}"
            f"{r['h100']:>13,.0f}"
        )
    print(
        f"* expected, not measured: {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s bf16 peak x "
        f"{ASSUMED_MFU:.0%} utilisation / forward FLOPs per patch. "
        f"'rs' = {args.resize_from} px patches resized to the input size on the fly."
    )


if __name__ == "__main__":
    main()
