"""Gate a synthetic ledger of N rows (default 1,000,000): dual-drop + bank update.

Run: python benchmarks/bench_gate.py [--rows 1000000]
Target (issue "Labeling and gating"): under 10 s on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from qtlib.config import GateConfig
from qtlib.gate import gate_round

AUGS = np.array(["hflip", "vflip", "rot90"])


def synthetic_ledger(rows: int, round_: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_img = rows // 3
    img = np.repeat(np.arange(n_img), 3)
    k = np.tile(np.arange(3), n_img)
    a = np.clip(rng.normal(0.5, 0.1, n_img)[img] + rng.normal(0, 0.03, n_img * 3), 0, 1)
    b = np.clip(a + rng.normal(0, 0.05, n_img * 3), 0, 1)
    s = 5 * (a + b)
    return pd.DataFrame({
        "image_id": pd.array([f"{i:016x}" for i in range(n_img)], dtype="string")[img],
        "source_index": img.astype(np.int32), "round": np.int32(round_), "shard": (img % 4).astype(np.int32),
        "index": (img // 4).astype(np.int32), "aug_index": k.astype(np.int8), "augmentation": AUGS[k],
        "raw_brisque": 100 * (1 - a), "raw_niqe": 10 * (1 - b), "norm_brisque": a, "norm_niqe": b, "S": s,
        "blocks_S": list(np.repeat(s[:, None], 4, axis=1).astype(np.float32)), "teacher_hash": "0" * 16,
        "metric_versions": "{}", "qtlib_version": "bench", "status": "ok",
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    led0 = synthetic_ledger(args.rows, 0, 0)
    led1 = synthetic_ledger(args.rows, 1, 1)
    cfg = GateConfig()
    t0 = time.perf_counter()
    r0 = gate_round(led0, None, cfg, n_aug=3)
    t1 = time.perf_counter()
    r1 = gate_round(led1, r0.bank, cfg, n_aug=3)
    t2 = time.perf_counter()
    print(f"rows per round: {args.rows:,}")
    print(f"round 0 (no previous bank): {t1 - t0:6.2f} s  counts={r0.counts}")
    print(f"round 1 (+ bank of {len(r0.bank):,} rows): {t2 - t1:6.2f} s  counts={r1.counts}")


if __name__ == "__main__":
    main()
