#!/usr/bin/env bash
# The GPU checks of the accelerator work, as one script for a lent GPU machine (its image has torch with
# CUDA, numpy, pyarrow, opencv, pillow, pyyaml, tqdm, matplotlib; nothing can be downloaded there).
#
# Prepare here, before the run: the wheels it lacks, for its Python, in an ignored folder carried along:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .gpu-wheels faiss-cpu==1.15.1
#   pip download --no-deps -d .gpu-wheels pytorch-metric-learning==2.9.0
# Then run it there with .gpu-wheels carried; results go to $OUT (default ./gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
site=$(mktemp -d)
python -m pip install --quiet --no-index --no-deps --target "$site" .gpu-wheels/*.whl
export PYTHONPATH="$site:src:."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output and exit status
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc=0
  timeout "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log" || rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}

# 1. every architecture: the cmce loop against a bare device-resident loop (target >= 0.70), resident split
#    and, with a zero budget, the pinned-memory prefetch path
step training 150 python -m benchmarks.training --device cuda --config configs/scale.yaml --no-write
step training_prefetch 150 python -m benchmarks.training --device cuda --config configs/scale.yaml \
    --set train.device_data_gb=0 --no-write
# 2. the 60k-image, 4-gallery-model configuration end to end (target <= 180 s)
step end_to_end 400 python -m benchmarks.end_to_end --device cuda --out "$(mktemp -d)/run" --no-write
# 3. evaluation on the GPU at 30k and 100k (the CPU section of BENCHMARKS.md is the reference)
step evaluation 200 python -m benchmarks.evaluation --device cuda --sizes 30000,100000 --repeats 1 \
    --dense-up-to 0 --no-write
cat "$out/summary.txt"
