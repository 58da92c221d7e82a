#!/usr/bin/env bash
# What a lent GPU checks of issue 29 in under 5 minutes, at real size (benchmarks/full_size.py: a full-size SD 1.5
# folder with both ControlNets and the released PanoHead architecture, random weights, built on the machine):
#   1. one stylize iteration (after a warm-up one) in fp16 and in bf16 through the CLI: s/iteration, the CUDA
#      allocator's peak and the peak RSS;
#   2. the same fp16 run through a 1-GPU `accelerate launch`;
#   3. device mismatch: one in-process step on cuda with every module checked on the GPU, and (on the small
#      models) one on cpu that must allocate nothing on the GPU.
# Prints a table per part and leaves results.json files under $OUT (default runs/gpu-check).
#     bash benchmarks/gpu_check.sh            # PY=python, OUT=folder, CACHE=model cache (about 3.7 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-runs/gpu-check}
CACHE=${CACHE:-/tmp/headstyle-full-size}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
"$PY" benchmarks/full_size.py --device cuda --precision fp16,bf16 --iterations 2 --cache "$CACHE" --out "$OUT/cli"
"$PY" benchmarks/full_size.py --device cuda --precision fp16 --iterations 2 --cache "$CACHE" --out "$OUT/accelerate" \
    --accelerate
"$PY" benchmarks/full_size.py --device cuda --check-devices --cache "$CACHE" --out "$OUT/devices"
"$PY" benchmarks/full_size.py --device cpu --check-devices --tiny --cache "$CACHE" --out "$OUT/devices"
echo "gpu check passed in $(( $(date +%s) - start )) s; results under $OUT"
