#!/usr/bin/env bash
# The GPU checks of the accelerator work, as one script for a lent GPU machine (its image has torch with
# CUDA, numpy, pyarrow, opencv, pillow, pyyaml, tqdm, matplotlib, scikit-learn; nothing can be downloaded there).
#
# Prepare here, before the run: the wheels it lacks, for its Python, in an ignored folder carried along:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .gpu-wheels faiss-cpu==1.15.1
#   pip download --no-deps -d .gpu-wheels pytorch-metric-learning==2.9.0
# Then run it there with .gpu-wheels carried, under a time limit above GPU_CHECK_BUDGET_S.
#
# Environment: OUT (results folder, default ./gpu-results), PYTHON (default python3), GPU_CHECK_BUDGET_S (seconds
# for all the steps together, default 540: a lent machine's call ends at 600 s), GPU_CHECK_DEVICE (default cuda),
# GPU_CHECK_SMOKE=1 (tiny sizes: a rehearsal of the whole script on any machine, cpu included). Rehearse before a
# lease, in an environment with only the image's packages and the carried wheels:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 OUT=/tmp/gpu-rehearsal bash benchmarks/gpu_check.sh   (2 min, 2 cores)
#
# The headline check runs first, so a budget cut short still answers it. Results: one .md per step (what the
# benchmark printed), summary.txt (the machine, each step's exit status and time) and logs.tar.gz (every
# step's stderr): seven files, within what a lent machine sends back.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
budget=${GPU_CHECK_BUDGET_S:-540}
device=${GPU_CHECK_DEVICE:-cuda}
py=${PYTHON:-python3}  # the lent machine's image has python3 (with torch), maybe no `python`
mkdir -p "$out"
logs=$(mktemp -d)
site=$(mktemp -d)
run=$(mktemp -d)
trap 'tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null || true; rm -rf "$logs" "$site" "$run"' EXIT
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    "$py" -m pip install --quiet --no-index --no-deps --target "$site" .gpu-wheels/*.whl
fi
export PYTHONPATH="$site:src:." PYTHONUNBUFFERED=1
{
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
    else
        echo "no nvidia-smi"
    fi
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
               torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')"
    echo "device $device, budget $budget s, smoke ${GPU_CHECK_SMOKE:-0}"
} > "$out/summary.txt" 2>&1

if [[ ${GPU_CHECK_SMOKE:-0} == 1 ]]; then
    train_size=(--images 128 --epochs 1 --repeats 1 --set train.batch_size=64)
    e2e_size=(--images 400 --classes 40 --set train.epochs=1 --set kd.epochs=1 --set transform.epochs=2
              --set train.batch_size=64 --set transform.batch_size=64)
    eval_sizes=2000,4000
else
    train_size=()
    e2e_size=()
    eval_sizes=30000,100000
fi

step() {  # step NAME SECONDS COMMAND...: run within its own limit and what is left of the budget
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS)) start=$SECONDS rc=0
    if ((left < 20)); then
        echo "$name: not run, the budget (GPU_CHECK_BUDGET_S=$budget) is spent" | tee -a "$out/summary.txt"
        return
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" > "$out/$name.md" 2> "$logs/$name.log" || rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

# 1. the 60k-image, 4-gallery-model configuration end to end (target <= 180 s)
step end_to_end 300 "$py" -m benchmarks.end_to_end --device "$device" --out "$run/end_to_end" --no-write \
    "${e2e_size[@]}"
# 2. every architecture: the cmce loop against a bare device-resident loop (target >= 0.70)
step training 100 "$py" -m benchmarks.training --device "$device" --config configs/scale.yaml --no-write \
    "${train_size[@]}"
# 3. evaluation on the device at 30k and 100k (the CPU section of BENCHMARKS.md is the reference)
step evaluation 120 "$py" -m benchmarks.evaluation --device "$device" --sizes "$eval_sizes" --repeats 1 \
    --dense-up-to 0 --no-write
# 4. the training loop's pinned-memory prefetch path (a zero memory budget keeps the split on the host)
step training_prefetch 100 "$py" -m benchmarks.training --device "$device" --config configs/scale.yaml \
    --set train.device_data_gb=0 --no-write "${train_size[@]}"
# 5. deterministic: true gives the same bytes on the device (the default may not): a smoke query model trained twice
#    each way, its sha256s printed
reruns() {
    "$py" -m cmce prepare-data --config configs/smoke.yaml --out "$run/smoke.parquet" >&2
    for setting in false true; do
        for i in 1 2; do
            "$py" -m cmce --device "$device" train --config configs/smoke.yaml --set "deterministic=$setting" \
                --set train.epochs=2 --dataset "$run/smoke.parquet" --model query --out "$run/q_${setting}_$i.pt" >&2
            echo "deterministic=$setting run $i: $(sha256sum < "$run/q_${setting}_$i.pt" | cut -c1-16)"
        done
    done
}
export -f reruns
export py device run
step deterministic 90 bash -c reruns  # (timeout runs programs, not functions)
cat "$out/summary.txt"
