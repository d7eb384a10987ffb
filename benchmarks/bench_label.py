"""Labeling: batched (qtlib.label) vs the authors' per-image loop; peak RSS vs number of images.

Run: python benchmarks/bench_label.py [--images 16] [--size 192] [--rss-small 64 --rss-large 512] [--json PATH]

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
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import record, write_json
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


def _now(device: str) -> float:
    """Process CPU time on a CPU (one thread: steady on a machine shared with other jobs), wall time on CUDA."""
    return time.process_time() if device == "cpu" else time.perf_counter()


class _Clock:
    """Accumulated seconds per named part (synchronizing CUDA around each)."""

    def __init__(self, device: str) -> None:
        self.device, self.total = device, {}

    def time(self, part: str, fn, *args):
        _sync(self.device)
        t0 = _now(self.device)
        out = fn(*args)
        _sync(self.device)
        self.total[part] = self.total.get(part, 0.0) + _now(self.device) - t0
        return out


@torch.no_grad()
def label_parts(teacher: Path, images: Path, out: Path, iqa: IQAConfig, label_cfg: LabelConfig,
                device: str = "cpu") -> dict[str, float]:
    """Seconds of each part of the label stage, each part run alone over all batches.

    teacher: the teacher under every augmentation (one stacked forward per batch);
    whole: ensemble scores of the whole labels; blocks: the 2x2 block scores;
    io: reading the images and writing the label store and the ledger (the same arrays as the stage).
    """
    from qtlib.augment import restore_augmented
    from qtlib.label import _ledger_rows, _open_staging_store
    from qtlib.ledger import LedgerWriter

    model = load_model(teacher, use_ema=True, device=device)
    store = ImageStore(images)
    ensemble = Ensemble(iqa, device=device)
    augs = get_augmentations(label_cfg.augmentations)
    metrics = list(ensemble.members)
    rows = np.arange(len(store.ids))
    bs = label_cfg.batch_size
    clock = _Clock(device)
    xs = [clock.time("io", lambda r: store.read_tensor(r).to(device), rows[i:i + bs]) for i in range(0, len(rows), bs)]
    flats = []
    for x in xs:
        pls = clock.time("teacher", lambda v: restore_augmented(lambda t: model(t, model.top_score), v, augs)
                         .clamp_(0, 1).mul_(255).round_().to(torch.uint8), x)
        flats.append(pls)
    scores = [clock.time("whole", ensemble.score, q.flatten(0, 1).float().div(255)) for q in flats]
    blocks = [clock.time("blocks", ensemble.score_blocks, q.flatten(0, 1).float().div(255)) for q in flats]
    meta = {"round": 0, "shard": 0, "teacher_hash": "x", "metric_versions": "{}"}

    def write() -> None:
        g = _open_staging_store(out / "parts.zarr", store, rows, augs, metrics, iqa.blocks, meta)
        with LedgerWriter(out / "parts.parquet", metrics) as writer:
            for i, (q, sc, bl) in enumerate(zip(flats, scores, blocks, strict=True)):
                b, k = q.shape[:2]
                sl = slice(i * bs, i * bs + b)
                g["labels"][sl] = q.cpu().numpy()
                g["S"][sl] = sc.S.double().cpu().numpy().reshape(b, k)
                g["raw"][sl] = torch.stack([sc.raw[m] for m in metrics], -1).double().cpu().numpy().reshape(b, k, -1)
                g["blocks_S"][sl] = bl.S.float().cpu().numpy().reshape(b, k, *iqa.blocks)
                g["blocks_raw"][sl] = torch.stack([bl.raw[m] for m in metrics], 1).float().cpu().numpy() \
                    .reshape(b, k, len(metrics), *iqa.blocks)
                ids = [store.ids[j] for j in rows[sl]]
                writer.write(_ledger_rows(ids, rows[sl], rows[sl], [a.name for a in augs], sc, bl, metrics, meta))

    clock.time("io", write)
    return clock.total


def throughput(n: int, size: int, device: str = "cpu", repeats: int | None = None) -> list[dict]:
    """The stage (``ours``), its parts alone, and the authors' loop, interleaved; one record per variant."""
    iqa, label_cfg = IQAConfig(batch_size=16), LabelConfig(batch_size=8)
    repeats = repeats or (3 if device == "cpu" else 3)
    with tempfile.TemporaryDirectory() as tmp:
        images, teacher = make_inputs(Path(tmp), n, size)
        if device == "cpu":
            torch.set_num_threads(1)  # with _now's CPU time: other jobs on the machine do not count
        times: dict[str, list[float]] = {"ours": [], "authors": []}
        parts: list[dict[str, float]] = []
        # warm-up (first metric builds, allocator, lazy imports), not counted
        label_shard(teacher, images, 0, 1, Path(tmp) / "w.zarr", Path(tmp) / "w.parquet", 0, iqa, label_cfg,
                    device=device, progress=False)
        for r in range(repeats):  # interleaved repeats (ours, its parts, the loop every other time); medians
            t0 = _now(device)
            label_shard(teacher, images, 0, 1, Path(tmp) / "out.zarr", Path(tmp) / "out.parquet", 0, iqa, label_cfg,
                        device=device, progress=False)
            _sync(device)
            times["ours"].append(_now(device) - t0)
            parts.append(label_parts(teacher, images, Path(tmp) / f"parts{r}", iqa, label_cfg, device))
            if r % 2 == 0:  # the loop is slow; it only needs to be roughly right for the >= 5x ratio
                t0 = _now(device)
                naive_label(teacher, images, iqa, device)
                _sync(device)
                times["authors"].append(_now(device) - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    part = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    total_parts = sum(part.values())
    overhead = med["ours"] / total_parts - 1
    clock = "process CPU time, 1 thread" if device == "cpu" else "wall time"
    print(f"labeling {n} images at {size}x{size} (3 augmentations, BRISQUE+NIQE, whole + 2x2 blocks), {device}, "
          f"median of {repeats}, {clock}:")
    for k, t in med.items():
        print(f"  {k:8s} {t:7.2f} s  {n / t:6.2f} images/s")
    print("  parts alone: " + ", ".join(f"{k} {v:.2f} s" for k, v in part.items()) + f" (sum {total_parts:.2f} s)")
    print(f"  the stage over the sum of its parts: {100 * overhead:+.1f}% (target <= 25%)")
    print(f"  speed-up ours vs the authors' loop: {med['authors'] / med['ours']:.2f}x (target >= 5x)")
    common = dict(metrics=list(ensemble_names(iqa)), size=size, images=n, augmentations=list(AUGS),
                  blocks=list(iqa.blocks), repeats=repeats, clock=clock)
    return [
        record("bench_label", device, variant="authors", img_per_s=n / med["authors"], seconds=med["authors"],
               batch=1, **common),
        record("bench_label", device, variant="ours", img_per_s=n / med["ours"], seconds=med["ours"],
               batch=label_cfg.batch_size, parts_s=part, parts_sum_s=total_parts, overhead=overhead,
               speedup_over_authors=med["authors"] / med["ours"], target="overhead <= 0.25", **common),
    ]


def ensemble_names(iqa: IQAConfig) -> list[str]:
    return [m.metric for m in iqa.ensemble]


RSS_CHILD = """
import json, resource, sys
from pathlib import Path
from qtlib.config import IQAConfig, LabelConfig, Member
from qtlib.label import label_shard
root = Path(sys.argv[1])
iqa = IQAConfig(ensemble=(Member("brisque", 1.0),), batch_size=16)
label_shard(root / "teacher.pt", root / "images.zarr", 0, 1, root / "out.zarr", root / "out.parquet", 0, iqa,
            LabelConfig(batch_size=8), device="cpu", progress=False)
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
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, metavar="PATH", help="write one record per variant to PATH")
    args = parser.parse_args()
    records = throughput(args.images, args.size, args.device, args.repeats)
    if args.skip_rss:
        write_json(args.json, records)
        return
    small, large = peak_rss(args.rss_small, 64), peak_rss(args.rss_large, 64)
    print(f"peak RSS labeling at 64x64: {args.rss_small} images {small:.0f} MiB, {args.rss_large} images "
          f"{large:.0f} MiB, ratio {large / small:.3f} (target <= 1.2)")
    records.append(record("bench_label_rss", "cpu", size=64, figures={"rss_small_mib": small, "rss_large_mib": large,
                                                                       "rss_ratio": large / small},
                          images=[args.rss_small, args.rss_large], target="rss_ratio <= 1.2"))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
