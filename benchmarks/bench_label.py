"""Labeling: batched (qtlib.label) vs the authors' per-image loop; peak RSS vs number of images.

Run: python benchmarks/bench_label.py [--images 16] [--size 192] [--rss-small 64 --rss-large 512]

1. Throughput, one process, same teacher and images: the batched stage (all three
   augmentations of a batch in one forward, whole labels and all 2x2 blocks in
   one metric call per chunk) against a naive loop with the authors' structure
   (batch 1 per augmentation, one metric call per label and per block).
   Target (issue "Labeling and gating"): >= 5x.
2. Peak RSS of `label_shard` on 64 vs 512 images at 64x64 (BRISQUE-only ensemble,
   since NIQE needs 96 px blocks), each in a fresh subprocess. Target: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qtlib.augment import get_augmentations
from qtlib.config import IQAConfig, LabelConfig, ModelConfig
from qtlib.data import ImageStore
from qtlib.data.store import StoreWriter, commit_path
from qtlib.iqa import Ensemble
from qtlib.iqa.ensemble import split_blocks
from qtlib.label import label_shard
from qtlib.models import Checkpoint, build_model, load_model, save_checkpoint

AUGS = ("hflip", "vflip", "rot90")


def make_inputs(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """A store of n photo crops and a teacher (default U-Net, perturbed so augmentations differ)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    writer = StoreWriter(root / "images.zarr", n, size)
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        writer.append(f"img{i:05d}", np.ascontiguousarray(p[y:y + size, x:x + size]))
    writer.close({})
    commit_path(writer.tmp, root / "images.zarr")
    torch.manual_seed(seed)
    cfg = ModelConfig()
    model = build_model(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    save_checkpoint(root / "teacher.pt", Checkpoint("pretrain", cfg, model.state_dict()))
    return root / "images.zarr", root / "teacher.pt"


@torch.no_grad()
def naive_label(teacher: Path, images: Path, iqa: IQAConfig, device: str = "cpu") -> int:
    """The authors' structure: per image, per augmentation, per block, batch 1 everywhere."""
    model = load_model(teacher, device=device)
    store = ImageStore(images)
    ensemble = Ensemble(iqa, device=device)
    augs = get_augmentations(AUGS)
    n = 0
    for i in range(len(store)):
        x = store.read_tensor([i]).to(device)
        for aug in augs:
            pl = aug.inverse(model(aug.forward(x), 7.0)).clamp(0, 1)
            pl = pl.mul(255).round().div(255)
            ensemble.score(pl)
            for block in split_blocks(pl, iqa.blocks):
                ensemble.score(block[None])
            n += 1
    return n


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(n: int, size: int, device: str = "cpu") -> None:
    iqa = IQAConfig(batch_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        images, teacher = make_inputs(Path(tmp), n, size)
        if device == "cpu":
            torch.set_num_threads(2)
        times: dict[str, list[float]] = {"batched": [], "naive": []}
        for _ in range(2 if device == "cpu" else 3):  # interleaved repeats; report the best of each
            t0 = time.perf_counter()
            label_shard(teacher, images, 0, 1, Path(tmp) / "out", 0, iqa, LabelConfig(batch_size=8), device=device,
                        progress=False)
            _sync(device)
            times["batched"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            naive_label(teacher, images, iqa, device)
            _sync(device)
            times["naive"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"labeling {n} images at {size}x{size} (3 augmentations, BRISQUE+NIQE, whole + 2x2 blocks), {device}:")
    for k, t in best.items():
        print(f"  {k:8s} {t:7.2f} s  {n / t:6.2f} images/s")
    print(f"  speed-up batched vs naive: {best['naive'] / best['batched']:.2f}x (target >= 5x)")


RSS_CHILD = """
import json, resource, sys
from pathlib import Path
from qtlib.config import IQAConfig, LabelConfig, Member
from qtlib.label import label_shard
root = Path(sys.argv[1])
iqa = IQAConfig(ensemble=(Member("brisque", 1.0),), batch_size=16)
label_shard(root / "teacher.pt", root / "images.zarr", 0, 1, root / "out", 0, iqa, LabelConfig(batch_size=8),
            device="cpu", progress=False)
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss(n: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(Path(tmp), n, size)
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, tmp], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--rss-small", type=int, default=64)
    parser.add_argument("--rss-large", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the batched stage and the loop both)")
    parser.add_argument("--skip-rss", action="store_true", help="only the throughput comparison")
    args = parser.parse_args()
    throughput(args.images, args.size, args.device)
    if args.skip_rss:
        return
    small, large = peak_rss(args.rss_small, 64), peak_rss(args.rss_large, 64)
    print(f"peak RSS labeling at 64x64: {args.rss_small} images {small:.0f} MiB, {args.rss_large} images "
          f"{large:.0f} MiB, ratio {large / small:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
