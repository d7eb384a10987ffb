#!/usr/bin/env bash
# Build `.gpu/` (git-ignored) for benchmarks/gpu_checks.sh: wheels of the packages a bare
# CUDA image with torch lacks, for its Python (default 3.12), and a TORCH_HOME with the
# BRISQUE/NIQE files that `qt weights prepare` built. Carry `.gpu` to the GPU machine.
set -euo pipefail
PY=${1:-3.12}
mkdir -p .gpu/wheels .gpu/torch_home/hub
pip download -q --only-binary=:all: --python-version "$PY" --no-deps -d .gpu/wheels \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  pyiqa==0.1.16 kornia==0.9.0 kornia-rs==0.2.0 zarr==3.1.6 numcodecs==0.16.6 donfig google-crc32c \
  jsonschema==4.26.0 jsonschema-specifications referencing rpds-py dill
cp -r "${TORCH_HOME:-$HOME/.cache/torch}/hub/pyiqa" .gpu/torch_home/hub/
du -sh .gpu
