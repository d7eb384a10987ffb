"""MUSIQ block scoring: qtlib's batched multi-scale path (``musiq_batched_tokens``) vs pyiqa's arch.

Run as ``python benchmarks/bench_musiq.py [--json PATH]``. Both variants are the
same metric object's parameters (MUSIQ-KonIQ layout with random weights,
``pretrained=False``: no download), scored on the same 2x2 blocks of photo
crops, in one process, interleaved (pyiqa, fast, pyiqa, fast, ...) and timed in
process CPU time; medians. The record has both times, their ratio, and the
largest score difference of the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_iqa import photo_crops
from benchmarks.record import record, write_json
from qtlib.iqa.ensemble import split_blocks
from qtlib.iqa.factory import create_metric
from qtlib.iqa.fast_musiq import FastMUSIQ


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=192, help="image side; blocks are size/2 (2x2 grid)")
    ap.add_argument("--width", type=int, nargs="+", default=None,
                    help="image widths, one record each (default: --size; others give non-square blocks)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    metric = create_metric("musiq", device=args.device, pretrained=False, fast=False)
    plain = metric.net
    fast = FastMUSIQ(plain).eval()
    records = []
    for w in args.width or [args.size]:
        records.append(_one(plain, fast, args, w))
    write_json(args.json, records)
    return records


def _one(plain: torch.nn.Module, fast: torch.nn.Module, args: argparse.Namespace, w: int) -> dict:
    images = photo_crops(args.images, max(args.size, w))[..., : args.size, :w].to(args.device)
    blocks = split_blocks(images, (2, 2))

    def timed(net: torch.nn.Module) -> tuple[float, torch.Tensor]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.process_time() if args.device == "cpu" else time.perf_counter()
        with torch.no_grad():
            y = net(blocks)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.process_time() if args.device == "cpu" else time.perf_counter()) - t0, y

    timed(plain), timed(fast)  # warm-up
    t_plain, t_fast, diff = [], [], 0.0
    for _ in range(args.reps):
        tp, yp = timed(plain)
        tf, yf = timed(fast)
        t_plain.append(tp)
        t_fast.append(tf)
        diff = max(diff, float((yp - yf).abs().max()))
    mp, mf = statistics.median(t_plain), statistics.median(t_fast)
    bh, bw = blocks.shape[-2:]
    rec = record(
        "bench_musiq", args.device, variant="musiq_batched_tokens", metrics=["musiq (random weights)"],
        size=f"{bh}x{bw} blocks of {args.images} {args.size}x{w}", batch=blocks.shape[0],
        grid=[2, 2], reps=args.reps, timer="process CPU time" if args.device == "cpu" else "wall time",
        figures={"pyiqa_over_fast": mp / mf, "max_abs_diff": diff},
        pyiqa_s=mp, fast_s=mf, pyiqa_s_all=t_plain, fast_s_all=t_fast,
    )
    print(f"blocks {tuple(blocks.shape)}: pyiqa {mp:.3f} s, fast {mf:.3f} s, ratio {mp / mf:.3f}x, max |diff| {diff:.2e}")
    return rec


if __name__ == "__main__":
    main()
