#!/usr/bin/env bash
# GPU checks, for a lent CUDA machine whose image has torch but not the rest.
# Carry `.gpu/` (wheels of the missing packages for its Python, and a TORCH_HOME
# holding pyiqa's BRISQUE/NIQE files from `qt weights prepare`). Measures block
# scoring and labeling batched vs looped on CUDA, and checks that the label stage's
# CUDA path agrees with its CPU path.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD TORCH_HOME=$PWD/.gpu/torch_home HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, pyiqa; print('torch', torch.__version__, 'pyiqa', pyiqa.__version__, 'cuda', torch.cuda.is_available())"
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
