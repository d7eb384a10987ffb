"""Benchmark of IQA scoring: whole-image throughput and 2x2 block scoring, batched vs a per-block loop.

Run as ``python benchmarks/bench_iqa.py`` (after ``qt weights prepare``). The
batched path is :meth:`qtlib.iqa.Ensemble.score_blocks` (all blocks of all
images stacked into the batch dimension); the loop is how the authors' code
scores blocks: one batch-1 metric call per block and metric. Both use the same
metric objects, in one run, on the same images.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pyiqa
import torch

from qtlib.config.types import IQAConfig, Member
from qtlib.imageio import to_tensor
from qtlib.iqa import Ensemble, normalize
from qtlib.iqa.ensemble import combine


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


def timed(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls after a warm-up (``warmup``, default one call of ``fn``)."""
    result = (warmup or fn)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default="brisque,niqe", help="ensemble members, equal weights (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    members = tuple(Member(m.strip(), 1.0) for m in args.metrics.split(","))
    grid = (2, 2)
    cfg = IQAConfig(ensemble=members, blocks=grid, batch_size=args.batch)
    ensemble = Ensemble(cfg, args.device)
    images = photo_crops(args.batch, args.size)
    n = images.shape[0]

    t_score, _ = timed(lambda: ensemble.score(images), args.repeats)
    t_batched, batched = timed(lambda: ensemble.score_blocks(images), args.repeats)
    # the loop is slow: warm it up on one image and time it once
    t_loop, looped = timed(lambda: blocks_loop(ensemble, images, grid), 1,
                           warmup=lambda: blocks_loop(ensemble, images[:1], grid))
    diff = (batched.S.cpu() - looped).abs().max().item()  # type: ignore[union-attr]

    print(f"IQA benchmark: pyiqa {pyiqa.__version__}, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} runs after a warm-up (loop: 1 run)")
    print(f"ensemble {' + '.join(f'{w:.2f} {m}' for m, w in zip(ensemble.members, ensemble.weights))}; "
          f"{n} images {args.size}x{args.size}; {grid[0]}x{grid[1]} blocks of {args.size // grid[0]} px")
    print(f"{'step':<44} {'seconds':>8} {'images/s':>9} {'metric calls':>13}")
    calls = len(ensemble.members)
    print(f"{'whole images, Ensemble.score':<44} {t_score:>8.3f} {n / t_score:>9.1f} {calls:>13}")
    print(f"{'2x2 blocks, batched (Ensemble.score_blocks)':<44} {t_batched:>8.3f} {n / t_batched:>9.1f} {calls:>13}")
    loop_calls = calls * n * grid[0] * grid[1]
    print(f"{'2x2 blocks, per-block batch-1 loop':<44} {t_loop:>8.3f} {n / t_loop:>9.1f} {loop_calls:>13}")
    print(f"block scoring speed-up, batched / loop: {t_loop / t_batched:.1f}x (target >= 4x); "
          f"max |S batched - S loop| = {diff:.4f}")


if __name__ == "__main__":
    main()
