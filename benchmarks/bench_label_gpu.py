"""Labeling with the paper's ensemble (MUSIQ-KonIQ + BRISQUE + CLIP-IQA) and a NAFNet-w32 teacher, and its training step.

One run measures (one JSON record per variant, ``--json PATH``):

* ``authors``: the authors' structure, batch 1: per image and augmentation one
  teacher call, one ensemble call for the label and one per 2x2 block;
* ``batched``: straightforward batching, in memory: all augmentations of a batch
  in one teacher forward, whole labels and all blocks in one ensemble call each;
* ``ours``: the label stage itself (``qtlib.label.label_shard``: Zarr in, Zarr and
  Parquet out) on the same images;
* ``batched_bf16_tf32``: ``batched`` with the teacher under bf16 autocast and TF32
  matmuls/convolutions for the metrics, with the largest |S - S_fp32| it causes
  (the tolerance question of bf16/TF32 for the network members);
* ``train_step``: one QualiTeacher step, NAFNet-w32, batch 16, MUSIQ + CLIP-IQA
  rewards (``benchmarks/bench_train.py``'s step), against plain_mt.

MUSIQ and CLIP RN50 have random weights and BRISQUE is the rebuilt file
(``benchmarks/random_weights.py``): no downloads, real architectures, meaningless scores.

Run (GPU): python benchmarks/bench_label_gpu.py --device cuda --json benchmarks/results/<date>_cuda_bench_label_gpu.json
Check that it runs (CPU, seconds): python benchmarks/bench_label_gpu.py --tiny
Targets (issue 14): ours >= 100 images/s at 256 px on one H200; train step >= 40 images/s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import record, write_json  # noqa: E402

AUGS = ("hflip", "vflip", "rot90")
PAPER = (("musiq", 0.4), ("brisque", 0.4), ("clipiqa", 0.2))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def photos(n: int, size: int, seed: int = 0) -> np.ndarray:
    from skimage import data

    src = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = src[i % len(src)]
        y, x = rng.integers(0, p.shape[0] - size + 1), rng.integers(0, p.shape[1] - size + 1)
        out.append(p[y:y + size, x:x + size])
    return np.stack(out)


def teacher_checkpoint(root: Path, width: int) -> Path:
    from qtlib.config import ModelConfig, NAFNetConfig
    from qtlib.models import Checkpoint, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="nafnet", nafnet=NAFNetConfig(width=width))
    model = build_model(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    save_checkpoint(root / "teacher.pt", Checkpoint("pretrain", cfg, model.state_dict()))
    return root / "teacher.pt"


def write_store(root: Path, imgs: np.ndarray) -> Path:
    from qtlib.data.store import StoreWriter, commit_path

    writer = StoreWriter(root / "images.zarr", len(imgs), imgs.shape[1])
    for i, im in enumerate(imgs):
        writer.append(f"img{i:05d}", np.ascontiguousarray(im))
    writer.close({})
    commit_path(writer.tmp, root / "images.zarr")
    return root / "images.zarr"


@torch.no_grad()
def authors(model, ensemble, x: torch.Tensor, augs, grid) -> None:
    from qtlib.iqa.ensemble import split_blocks

    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        for aug in augs:
            pl = aug.inverse(model(aug.forward(xi), model.top_score)).clamp(0, 1).mul(255).round().div(255)
            ensemble.score(pl)
            for block in split_blocks(pl, grid):
                ensemble.score(block[None])


@torch.no_grad()
def batched(model, ensemble, x: torch.Tensor, augs, batch: int, bf16: bool = False) -> torch.Tensor:
    """Whole + block ensemble scores of every label; returns S of the whole labels (N*K,)."""
    from qtlib.augment import restore_augmented
    from qtlib.train.compute import autocast

    out = []
    for xb in x.split(batch):
        with autocast(xb.device, bf16):
            pls = restore_augmented(lambda t: model(t, model.top_score), xb, augs)
        flat = pls.float().clamp(0, 1).mul(255).round().div(255).flatten(0, 1)
        out.append(ensemble.score(flat).S)
        ensemble.score_blocks(flat)
    return torch.cat(out)


def label_records(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from qtlib.augment import get_augmentations
    from qtlib.config import IQAConfig, LabelConfig, Member
    from qtlib.iqa import Ensemble
    from qtlib.label import label_shard
    from qtlib.models import load_model

    dev = args.device
    iqa = IQAConfig(ensemble=tuple(Member(m, w) for m, w in PAPER), batch_size=args.batch)
    imgs = photos(args.images, args.size)
    teacher = teacher_checkpoint(tmp, args.width)
    store = write_store(tmp, imgs)
    model = load_model(teacher, use_ema=True, device=dev)
    ensemble = Ensemble(iqa, device=dev, fast=False)  # the baselines run pyiqa's own code; "ours" is the stage
    augs = get_augmentations(AUGS)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).to(dev)
    n_auth = min(args.authors_images, args.images)
    common = dict(model=f"NAFNet-w{args.width}", metrics=[m for m, _ in PAPER], size=args.size,
                  augmentations=list(AUGS), blocks=list(iqa.blocks))

    def stage() -> None:
        label_shard(teacher, store, 0, 1, tmp / "out.zarr", tmp / "out.parquet", 0, iqa,
                    LabelConfig(batch_size=args.batch, augmentations=AUGS), device=dev, progress=False)

    with tf32(False):
        batched(model, ensemble, x[:args.batch], augs, args.batch)  # warm-up (cuDNN, allocator)
        s_fp32 = batched(model, ensemble, x, augs, args.batch)
    times: dict[str, list[float]] = {"authors": [], "batched": [], "ours": [], "batched_bf16_tf32": []}
    for r in range(args.repeats):
        with tf32(False):
            if r == 0:  # slow; once is enough for its ratio
                times["authors"].append(_timed(dev, lambda: authors(model, ensemble, x[:n_auth], augs, iqa.blocks)))
            times["batched"].append(_timed(dev, lambda: batched(model, ensemble, x, augs, args.batch)))
            times["ours"].append(_timed(dev, stage))
        with tf32(True):
            times["batched_bf16_tf32"].append(_timed(dev, lambda: batched(model, ensemble, x, augs, args.batch, True)))
    with tf32(True):
        s_fast = batched(model, ensemble, x, augs, args.batch, True)
    ds = float((s_fast - s_fp32).abs().max())
    n_of = {"authors": n_auth}
    recs = []
    for v, ts in times.items():
        t = statistics.median(ts)
        n = n_of.get(v, args.images)
        extra = {"max_abs_dS_vs_fp32": ds} if v == "batched_bf16_tf32" else {}
        if v == "ours":
            extra["target"] = "img_per_s >= 100 (H200, 256 px)"
        recs.append(record("bench_label_gpu", dev, variant=v, img_per_s=n / t, seconds=t, images=n,
                           batch=1 if v == "authors" else args.batch, **common, **extra))
        print(f"{v:18s} {n / t:8.2f} images/s ({n} images, median of {len(ts)})" +
              (f"; max |S - S_fp32| {ds:.4f} (0..10 scale)" if extra.get("max_abs_dS_vs_fp32") is not None else ""))
    return recs


def train_record(args: argparse.Namespace) -> dict:
    from benchmarks import bench_train

    targs = argparse.Namespace(batch=args.train_batch, patch=args.size, backbone="nafnet", width=16, depth=3,
                               device=args.device, steps=args.train_steps, warmup=2, at_top=0)
    iqa = bench_train.ENSEMBLES["musiq+clipiqa"]
    bf16 = args.device.startswith("cuda")
    steps = {m: bench_train.make_step(m, iqa, targs, bf16) for m in ("plain_mt", "qualiteacher")}
    wall, cpu = bench_train.measure(steps, targs, 0)
    key = "wall" if args.device.startswith("cuda") else "cpu"
    t = wall if key == "wall" else cpu
    print(f"train step NAFNet-w32 batch {targs.batch} at {targs.patch} px, MUSIQ+CLIP-IQA rewards"
          f"{', bf16' if bf16 else ''}: {targs.batch / wall['qualiteacher']:.1f} images/s (QualiTeacher), "
          f"{targs.batch / wall['plain_mt']:.1f} (plain_mt), ratio {t['qualiteacher'] / t['plain_mt']:.2f}x")
    return record("bench_label_gpu", args.device, variant="train_step", model="NAFNet-w32",
                  metrics=["musiq", "clipiqa"], patch=targs.patch, batch=targs.batch,
                  precision="bf16" if bf16 else "fp32", img_per_s=targs.batch / wall["qualiteacher"],
                  img_per_s_plain_mt=targs.batch / wall["plain_mt"], ratio_basis=key,
                  qt_over_plain_worst=t["qualiteacher"] / t["plain_mt"], qt_over_plain_top=float("nan"),
                  target="img_per_s >= 40 (H200, 256 px, batch 16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--authors-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=32, help="NAFNet width (the paper: 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long CPU run that checks the script works")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.images, args.authors_images, args.size, args.batch = "cpu", 2, 1, 64, 2
        args.width, args.repeats, args.train_batch, args.train_steps = 8, 1, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        from benchmarks.random_weights import install

        install(Path(tmp) / "torch_home")
        torch.manual_seed(0)
        recs = label_records(args, Path(tmp))
        if not args.skip_train:
            recs.append(train_record(args))
    write_json(args.json, recs)


if __name__ == "__main__":
    main()
