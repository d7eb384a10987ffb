#!/usr/bin/env bash
# GPU checks, for a lent CUDA machine whose image has torch but not the rest.
# Carry `.gpu/` (wheels of the missing packages for its Python, and a TORCH_HOME
# holding pyiqa's BRISQUE/NIQE files from `qt weights prepare`). Measures block
# scoring and labeling batched vs looped on CUDA, checks that the label stage's
# CUDA path agrees with its CPU path, and (first, the figures issue 14 needs) runs
# benchmarks/bench_label_gpu.py (paper ensemble with random MUSIQ/CLIP weights,
# NAFNet-w32, 256 px: authors / batched / ours, and the training step) and
# bench_train.py on CUDA, writing JSON records to $OUT (default: benchmarks/results).
# One shot: `bash benchmarks/gpu_checks.sh` (about 6-8 minutes on an H200).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD TORCH_HOME=$PWD/.gpu/torch_home HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, pyiqa; print('torch', torch.__version__, 'pyiqa', pyiqa.__version__, 'cuda', torch.cuda.is_available())"
RES=${OUT:-benchmarks/results}; DAY=$(date -u +%F); mkdir -p "$RES"
echo "== bench_label_gpu (cuda): paper ensemble, NAFNet-w32, 256 px; training step"
timeout 300 python3 benchmarks/bench_label_gpu.py --device cuda --json "$RES/${DAY}_cuda_bench_label_gpu.json" 2>&1 \
  | grep -v Warn | tail -12
echo "== bench_train (cuda): NAFNet-w32, batch 16, 256 px, BRISQUE reward, bf16"
timeout 150 python3 benchmarks/bench_train.py --device cuda --backbone nafnet --batch 16 --patch 256 --precision bf16 \
  --steps 6 --json "$RES/${DAY}_cuda_bench_train.json" 2>&1 | grep -v Warn | tail -8
echo "== bench_musiq (cuda): MUSIQ blocks, qtlib's batched tokens vs pyiqa's arch (random weights)"
timeout 120 python3 benchmarks/bench_musiq.py --device cuda --images 16 --size 256 --reps 10 \
  --json "$RES/${DAY}_cuda_bench_musiq.json" 2>&1 | grep -v Warn | tail -3
echo "== bench_iqa (cuda)"; python3 benchmarks/bench_iqa.py --device cuda --repeats 5 2>&1 | grep -v Warn | tail -25
echo "== bench_label (cuda)"; python3 benchmarks/bench_label.py --device cuda --images 64 --skip-rss 2>&1 | grep -v Warn | tail -5
echo "== label stage: cuda vs cpu"
python3 - <<'PY'
import tempfile
from pathlib import Path

import numpy as np
import zarr

from benchmarks.bench_label import make_inputs
from qtlib.config import IQAConfig, LabelConfig
from qtlib.label import label_shard

with tempfile.TemporaryDirectory() as tmp:
    images, teacher = make_inputs(Path(tmp), 8, 192)
    out = {}
    for dev in ("cuda", "cpu"):
        label_shard(teacher, images, 0, 1, Path(tmp) / dev / "labels" / "shard_0.zarr", Path(tmp) / dev / "l.parquet", 0,
                    IQAConfig(), LabelConfig(batch_size=4), device=dev,
                    progress=False)
        out[dev] = zarr.open_group(str(Path(tmp) / dev / "labels" / "shard_0.zarr"), mode="r")
    px = np.abs(out["cuda"]["labels"][:].astype(int) - out["cpu"]["labels"][:].astype(int))
    ds = np.abs(out["cuda"]["S"][:] - out["cpu"]["S"][:])
    print(f"labels: max |cuda-cpu| = {px.max()} (of 255), {100 * (px > 0).mean():.3f}% pixels differ; "
          f"S: max |cuda-cpu| = {ds.max():.4f}")
PY
