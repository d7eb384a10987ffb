"""Benchmark of IQA scoring: whole-image throughput and 2x2 block scoring, batched vs a per-block loop.

Run as ``python benchmarks/bench_iqa.py`` (after ``qt weights prepare``). The
batched path is :meth:`qtlib.iqa.Ensemble.score_blocks` (all blocks of all
images stacked into the batch dimension); the loop is how the authors' code
scores blocks: one batch-1 metric call per block and metric. Both use the same
metric objects, in one run, on the same images.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyiqa
import torch

from qtlib.config.types import IQAConfig, Member
from qtlib.imageio import to_tensor
from qtlib.iqa import Ensemble, normalize
from qtlib.iqa.ensemble import combine, split_blocks


def photo_crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` random crops of photos that ship with scikit-image."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    crops = []
    for k in range(n):
        photo = photos[k % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size + 1))
        x = int(rng.integers(0, photo.shape[1] - size + 1))
        crops.append(to_tensor(np.ascontiguousarray(photo[y : y + size, x : x + size])))
    return torch.stack(crops)


def blocks_loop(ensemble: Ensemble, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Block S the way a per-block loop computes it: one batch-1 call per block and metric."""
    gh, gw = grid
    b, _, h, w = images.shape
    bh, bw = h // gh, w // gw
    weights = dict(zip(ensemble.members, ensemble.weights))
    out = torch.empty(b, gh, gw)
    with torch.no_grad():
        for n in range(b):
            for i in range(gh):
                for j in range(gw):
                    block = images[n : n + 1, :, i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
                    norm = {m: normalize(m, metric(block).reshape(-1).float()) for m, metric in ensemble.metrics.items()}
                    out[n, i, j] = combine(norm, weights)[0]
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Timing:
    """Wall and CPU seconds of repeated runs of one step."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], object]) -> object:
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(cpu_seconds() - cpu)
        return result


def interleaved(steps: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, Timing], dict[str, object]]:
    """Run every step once to warm up, then ``repeats`` rounds of all steps in turn.

    Interleaving spreads the interference of other processes on a shared machine
    over all steps; the minimum over rounds is the least disturbed measurement.
    """
    results = {name: fn() for name, fn in steps.items()}
    timings = {name: Timing() for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            results[name] = timings[name].run(fn)
    return timings, results


def per_block_loop(metric: torch.nn.Module, blocks: torch.Tensor) -> None:
    with torch.no_grad():
        for k in range(blocks.shape[0]):
            metric(blocks[k : k + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default="brisque,niqe", help="ensemble members, equal weights (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    members = tuple(Member(m.strip(), 1.0) for m in args.metrics.split(","))
    grid = (2, 2)
    cfg = IQAConfig(ensemble=members, blocks=grid, batch_size=args.batch)
    ensemble = Ensemble(cfg, args.device)
    images = photo_crops(args.batch, args.size).to(args.device)
    blocks = split_blocks(images, grid)
    n = images.shape[0]

    steps: dict[str, Callable[[], object]] = {
        "whole images, Ensemble.score": lambda: ensemble.score(images),
        "2x2 blocks, batched (Ensemble.score_blocks)": lambda: ensemble.score_blocks(images),
        "2x2 blocks, per-block batch-1 loop": lambda: blocks_loop(ensemble, images, grid),
    }
    for m, metric in ensemble.metrics.items():
        steps[f"  {m}: {blocks.shape[0]} blocks in one call"] = lambda metric=metric: metric(blocks)
        steps[f"  {m}: {blocks.shape[0]} batch-1 calls"] = lambda metric=metric: per_block_loop(metric, blocks)
    with torch.no_grad():
        timings, results = interleaved(steps, args.repeats)
    batched, looped = results["2x2 blocks, batched (Ensemble.score_blocks)"], results["2x2 blocks, per-block batch-1 loop"]
    diff = (batched.S.cpu() - looped).abs().max().item()  # type: ignore[union-attr]

    load = os.getloadavg()[0]
    print(f"IQA benchmark: pyiqa {pyiqa.__version__}, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"ensemble {' + '.join(f'{w:.2f} {m}' for m, w in zip(ensemble.members, ensemble.weights))}; "
          f"{n} images {args.size}x{args.size}; {grid[0]}x{grid[1]} blocks of {args.size // grid[0]} px; "
          f"min / median of {args.repeats} interleaved rounds after a warm-up")
    print(f"{'step':<46} {'wall min':>9} {'wall med':>9} {'cpu min':>8} {'img/s':>7}")
    for name, t in timings.items():
        rate = f"{n / min(t.wall):>7.1f}" if not name.startswith("  ") else ""
        print(f"{name:<46} {min(t.wall):>9.3f} {statistics.median(t.wall):>9.3f} {min(t.cpu):>8.3f} {rate}")
    tb, tl = timings["2x2 blocks, batched (Ensemble.score_blocks)"], timings["2x2 blocks, per-block batch-1 loop"]
    print(f"block scoring speed-up, batched vs loop: {min(tl.wall) / min(tb.wall):.1f}x by min wall, "
          f"{statistics.median(tl.wall) / statistics.median(tb.wall):.1f}x by median wall, "
          f"{min(tl.cpu) / min(tb.cpu):.1f}x by CPU time (target >= 4x); max |S batched - S loop| = {diff:.4f}")


if __name__ == "__main__":
    main()
