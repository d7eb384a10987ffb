"""Peak RSS of ``qt restore`` on large images, each in a fresh subprocess.

Usage:
    python benchmarks/bench_memory.py [--sizes 4000x3000 13000x13000] [--whole 4000x3000] [--json PATH]

A tiny checkpoint (U-Net of width 4, depth 2) keeps the run memory-bound, not
compute-bound. For every size a PNG is written (a tiled random patch, so it
compresses), then ``qt restore`` runs on it in a subprocess with the default
settings (tiling above 2048 px, streamed into a uint8 buffer); sizes given to
``--whole`` also run with ``--tile-above 0`` (the whole image at once). Peak RSS
is the child's ``ru_maxrss``; ``baseline`` is the same command on a 64x64 image
(Python, torch, the model), and ``net_bytes_per_pixel`` is (peak - baseline) /
pixels, the part that grows with the image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qtlib.config import ModelConfig, UNetConfig
from qtlib.models import Checkpoint, build_model, save_checkpoint


def parse_size(text: str) -> tuple[int, int]:
    """``"4000x3000"`` -> (width, height)."""
    w, h = text.lower().split("x")
    return int(w), int(h)


def write_png(path: Path, width: int, height: int) -> None:
    """A compressible PNG: a 256x256 random patch tiled over the image (uint8 only, no float copy)."""
    patch = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rows = np.tile(patch, (1, -(-width // 256), 1))[:, :width]
    image = np.tile(rows, (-(-height // 256), 1, 1))[:height]
    Image.fromarray(image).save(path, compress_level=1)


def tiny_checkpoint(path: Path) -> Path:
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
    torch.manual_seed(0)
    return save_checkpoint(path, Checkpoint("pretrain", cfg, build_model(cfg).state_dict()))


def child(argv: list[str]) -> None:
    """Run ``qt restore ARGV`` in this process, then print its peak RSS as JSON."""
    from qtlib.cli import main

    t0 = time.perf_counter()
    rc = main(["restore", "--quiet", "--device", "cpu", *argv])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"rc": rc, "peak_rss_bytes": peak, "seconds": time.perf_counter() - t0}))


def run_child(image: Path, out: Path, ckpt: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--checkpoint", str(ckpt), *extra, str(image), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"rc": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:] or ["killed?"]}
    return json.loads(lines[-1])


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"node": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version()}


def main() -> None:
    if "--child" in sys.argv:
        child([a for a in sys.argv[1:] if a != "--child"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4000x3000", "13000x13000"], metavar="WxH")
    parser.add_argument("--whole", nargs="*", default=["4000x3000"], metavar="WxH",
                        help="also restore these sizes whole (--tile-above 0)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as one JSON object")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = tiny_checkpoint(root / "tiny.pt")
        write_png(root / "base.png", 64, 64)
        base = run_child(root / "base.png", root / "base_out.png", ckpt, [])
        print(f"baseline (64x64): {base.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")
        for text in args.sizes:
            w, h = parse_size(text)
            image = root / f"{w}x{h}.png"
            write_png(image, w, h)
            modes = [("tiled (default)", [])] + ([("whole", ["--tile-above", "0"])] if text in args.whole else [])
            for mode, extra in modes:
                res = run_child(image, root / f"out_{w}x{h}.png", ckpt, extra)
                row = {"size": text, "width": w, "height": h, "pixels": w * h, "mode": mode, **res}
                if "peak_rss_bytes" in res:
                    row["bytes_per_pixel"] = res["peak_rss_bytes"] / (w * h)
                    row["net_bytes_per_pixel"] = (res["peak_rss_bytes"] - base["peak_rss_bytes"]) / (w * h)
                    print(f"{text:>12} {mode:<16} peak {res['peak_rss_bytes'] / 2**30:6.2f} GiB  "
                          f"{row['bytes_per_pixel']:6.1f} B/px  net {row['net_bytes_per_pixel']:6.1f} B/px  "
                          f"{res['seconds']:6.1f} s")
                else:
                    print(f"{text:>12} {mode:<16} failed: {res}")
                results.append(row)
            image.unlink()
    record = {"benchmark": "bench_memory", "machine": machine(), "torch": torch.__version__,
              "checkpoint": "unet width 4 depth 2", "baseline": base, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
