"""Native-resolution labeling: a mixed-size folder vs the same pixels as fixed 256 crops; peak RSS of one large image.

Run: python benchmarks/bench_native.py [--json PATH] [--images 8] [--large 2000x1500] [--tile 512]

1. Throughput, one process, same teacher (the demo's U-Net) and ensemble (BRISQUE + NIQE,
   2x2 blocks): ``label_shard`` on a per-image store of ``--images`` photos from 400x300 to
   800x600 (landscape and portrait; batches bucket by shape, rot90 views of non-square images
   are their own teacher call) against a square store of 256x256 crops cut from the same
   images (as many as fit, so nearly the same pixels). Reported in pixels per second, since
   an image is not a unit of work when sizes differ.
2. Peak RSS of ``label_shard`` on one ``--large`` image (restored tile by tile above
   ``--tile`` px, scored whole), in a fresh subprocess, against the same subprocess on one
   256x256 image (the import and model baseline).

The issue asks for a 6000x4000 image; the default here is 2000x1500 so that the run fits a
few minutes on a shared 2-core machine (NIQE and BRISQUE on a whole 24 MP label in float64
take minutes per augmentation on such a CPU). ``--large 6000x4000`` runs the full size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qtlib.config import IQAConfig, LabelConfig, ModelConfig, UNetConfig
from qtlib.config.types import Member
from qtlib.data.store import PerImageWriter, StoreWriter, commit_path
from qtlib.label import label_shard
from qtlib.models import Checkpoint, build_model, save_checkpoint

IQA = IQAConfig(ensemble=(Member("brisque", 0.5), Member("niqe", 0.5)), blocks=(2, 2), batch_size=8)
CROP = 256


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """An (h, w, 3) uint8 photo: a skimage photo resized to (h, w) (texture for the metrics)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return np.asarray(Image.fromarray(photos[seed % len(photos)]).resize((w, h), Image.Resampling.BICUBIC))


def mixed_sizes(n: int) -> list[tuple[int, int]]:
    """n sizes from 400x300 to 800x600, alternating landscape and portrait."""
    out = []
    for i in range(n):
        w = 400 + (400 * i) // max(1, n - 1)
        h = w * 3 // 4
        out.append((h, w) if i % 2 == 0 else (w, h))
    return out


def teacher(root: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(unet=UNetConfig(width=16, depth=3))
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_checkpoint(root / "teacher.pt", Checkpoint("pretrain", cfg, model.state_dict()))


def stores(root: Path, sizes: list[tuple[int, int]]) -> tuple[Path, Path, int, int]:
    """(mixed store, crops store, pixels in mixed, pixels in crops)."""
    mixed = PerImageWriter(root / "mixed.zarr")
    crops: list[np.ndarray] = []
    for i, (h, w) in enumerate(sizes):
        img = _photo(h, w, i)
        mixed.append(f"img{i}", img)
        crops += [img[y:y + CROP, x:x + CROP] for y in range(0, h - CROP + 1, CROP) for x in range(0, w - CROP + 1, CROP)]
    mixed.close({})
    commit_path(mixed.tmp, root / "mixed.zarr")
    square = StoreWriter(root / "crops.zarr", len(crops), CROP)
    for i, c in enumerate(crops):
        square.append(f"crop{i}", np.ascontiguousarray(c))
    square.close({})
    commit_path(square.tmp, root / "crops.zarr")
    return root / "mixed.zarr", root / "crops.zarr", sum(h * w for h, w in sizes), len(crops) * CROP * CROP


def time_label(images: Path, ckpt: Path, out: Path, tile: int) -> float:
    t0 = time.perf_counter()
    label_shard(ckpt, images, 0, 1, out / "labels.zarr", out / "ledger.parquet", 0, IQA,
                LabelConfig(batch_size=8, tile=tile), device="cpu", progress=False)
    return time.perf_counter() - t0


def child_rss(h: int, w: int, tile: int) -> None:
    """Label one h x w image; print the peak RSS in MiB (ru_maxrss is KiB on Linux)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer = PerImageWriter(root / "one.zarr")
        writer.append("big", _photo(h, w, 0))
        writer.close({})
        commit_path(writer.tmp, root / "one.zarr")
        t = time_label(root / "one.zarr", teacher(root), root, tile)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": t}))


def rss(h: int, w: int, tile: int) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{w}x{h}", "--tile", str(tile)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--large", default="2000x1500", help="WxH of the peak-RSS image")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.child:
        w, h = (int(v) for v in args.child.split("x"))
        child_rss(h, w, args.tile)
        return
    sizes = mixed_sizes(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = teacher(root)
        mixed, crops, px_mixed, px_crops = stores(root, sizes)
        (root / "a").mkdir(), (root / "b").mkdir()
        t_mixed = time_label(mixed, ckpt, root / "a", 0)
        t_crops = time_label(crops, ckpt, root / "b", 0)
    w, h = (int(v) for v in args.large.split("x"))
    big, small = rss(h, w, args.tile), rss(CROP, CROP, args.tile)
    result = {
        "machine": f"CPU, torch threads 2, {torch.__version__}",
        "ensemble": "brisque 0.5 + niqe 0.5, 2x2 blocks; teacher U-Net width 16 depth 3; 3 augmentations",
        "mixed": {"images": len(sizes), "sizes_hw": sizes, "pixels": px_mixed, "seconds": t_mixed,
                  "mpx_per_s": px_mixed / t_mixed / 1e6},
        "crops_256": {"images": px_crops // (CROP * CROP), "pixels": px_crops, "seconds": t_crops,
                      "mpx_per_s": px_crops / t_crops / 1e6},
        "native_vs_crops_throughput": (px_mixed / t_mixed) / (px_crops / t_crops),
        "peak_rss": {"large_wh": [w, h], "tile": args.tile, "large_mib": big["peak_rss_mib"],
                     "large_seconds": big["seconds"], "baseline_256_mib": small["peak_rss_mib"],
                     "large_minus_baseline_mib": big["peak_rss_mib"] - small["peak_rss_mib"]},
    }
    print(f"{'what':<34} {'pixels':>10} {'seconds':>8} {'Mpx/s':>7}")
    for name in ("mixed", "crops_256"):
        r = result[name]
        print(f"{name + ' (' + str(r['images']) + ' images)':<34} {r['pixels']:>10} {r['seconds']:>8.1f} "
              f"{r['mpx_per_s']:>7.3f}")
    print(f"native / crops throughput: {result['native_vs_crops_throughput']:.2f}")
    p = result["peak_rss"]
    print(f"peak RSS, one {w}x{h} image (tile {args.tile}): {p['large_mib']:.0f} MiB "
          f"({p['large_seconds']:.0f} s); one 256x256 image: {p['baseline_256_mib']:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
