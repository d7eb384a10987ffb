"""Restore throughput of the backbones at 256x256 on this machine, and the cost of score conditioning.

Usage:
    python benchmarks/bench_models.py [--repeats 31] [--batch 1] [--nafnet-blocks 1 1 1 28]
                                      [--folder-images 8] [--device cpu]

Throughput: model forward (eval, inference mode) on 256x256 inputs with all
intra-op threads, bare backbone and wrapped in ScoreConditioned, timed
interleaved (bare, wrapped, wrapped, bare, ...) so drifts in machine load hit
both alike; medians. ``restore_path`` is end to end over a folder of PNGs
(read, restore, write).

Conditioning overhead: the median over repeats of the per-pair ratio
wrapped / bare - 1, with its interquartile range. On a CPU shared with other
jobs wall time is dominated by their load, so the overhead is measured single
threaded in process CPU time (``time.process_time``), which other processes do
not inflate; wall-time ratios are printed too. ``embed us`` is the wrapper's
own extra work in isolation (embedding of the score), for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qtlib.config import ConditioningConfig, ModelConfig, NAFNetConfig, UNetConfig
from qtlib.imageio import write_image
from qtlib.models import ScoreConditioned, build_backbone
from qtlib.restore import restore_path


def measure(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(bare: torch.nn.Module, wrapped: ScoreConditioned, x: torch.Tensor, repeats: int,
                sync: Callable[[], None]) -> dict[str, list[float]]:
    """Per-repeat wall/CPU times of both models, order alternating every repeat."""
    score = torch.full((x.shape[0],), 7.0, device=x.device)
    calls = {"bare": lambda: bare(x), "wrapped": lambda: wrapped(x, score)}
    out: dict[str, list[float]] = {k: [] for k in ("bare_wall", "bare_cpu", "wrapped_wall", "wrapped_cpu")}
    with torch.inference_mode():
        for fn in calls.values():  # warm-up
            fn()
            fn()
        for r in range(repeats):
            for name in ("bare", "wrapped") if r % 2 == 0 else ("wrapped", "bare"):
                wall, cpu = measure(calls[name], sync)
                out[f"{name}_wall"].append(wall)
                out[f"{name}_cpu"].append(cpu)
    return out


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of num/den - 1, in percent."""
    ratios = [100 * (a / b - 1) for a, b in zip(num, den, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def embed_time(wrapped: ScoreConditioned, batch: int, device: torch.device, sync: Callable[[], None]) -> float:
    score = torch.full((batch,), 7.0, device=device)
    with torch.inference_mode():
        return statistics.median(measure(lambda: wrapped.embed(score, batch, device), sync)[0] for _ in range(200))


def folder_throughput(wrapped: torch.nn.Module, n: int, device: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(n):
            write_image(root / "in" / f"{i:03d}.png", torch.rand(3, 256, 256))
        restore_path(wrapped, root / "in" / "000.png", root / "warm.png", device=device, progress=False)
        res = restore_path(wrapped, root / "in", root / "out", device=device, progress=False)
    return n / res.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--nafnet-blocks", type=int, nargs=4, default=[1, 1, 1, 28], metavar="N",
                        help="NAFNet encoder blocks (default: NAFNet-width32's 1 1 1 28)")
    parser.add_argument("--folder-images", type=int, default=8, help="images for the restore_path run (0 = skip)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    configs = {
        "unet w16 d3": ModelConfig(backbone="unet", unet=UNetConfig(width=16, depth=3)),
        f"nafnet w32 enc {' '.join(map(str, args.nafnet_blocks))}": ModelConfig(
            backbone="nafnet", nafnet=NAFNetConfig(width=32, enc_blocks=tuple(args.nafnet_blocks))),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {dev}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"batch {args.batch}, {args.size}x{args.size}, {args.repeats} interleaved repeats")
    head = (f"{'model':<24}{'params M':>9}{'bare img/s':>11}{'wrapped img/s':>14}{'restore_path img/s':>19}"
            f"{'overhead cpu 1thr [IQR]':>26}{'overhead wall':>14}{'embed us':>9}")
    print(head)
    print("-" * len(head))
    for name, cfg in configs.items():
        bare = build_backbone(cfg).to(dev).eval()
        wrapped = ScoreConditioned(bare, ConditioningConfig()).to(dev).eval()
        x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
        fast = interleaved(bare, wrapped, x, args.repeats, sync)
        folder = folder_throughput(wrapped, args.folder_images, args.device) if args.folder_images else float("nan")
        if dev.type == "cpu":
            torch.set_num_threads(1)
            single = interleaved(bare, wrapped, x, args.repeats, sync)
            torch.set_num_threads(threads)
            med, q1, q3 = ratio_stats(single["wrapped_cpu"], single["bare_cpu"])
        else:
            med, q1, q3 = ratio_stats(fast["wrapped_wall"], fast["bare_wall"])
        wall_med = ratio_stats(fast["wrapped_wall"], fast["bare_wall"])[0]
        params = sum(p.numel() for p in bare.parameters()) / 1e6
        ips_bare = args.batch / statistics.median(fast["bare_wall"])
        ips_wrap = args.batch / statistics.median(fast["wrapped_wall"])
        print(f"{name:<24}{params:>9.2f}{ips_bare:>11.2f}{ips_wrap:>14.2f}{folder:>19.2f}"
              f"{f'{med:+.2f}% [{q1:+.1f}, {q3:+.1f}]':>26}{f'{wall_med:+.2f}%':>14}"
              f"{1e6 * embed_time(wrapped, args.batch, dev, sync):>9.0f}")


if __name__ == "__main__":
    main()
