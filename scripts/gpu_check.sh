#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine (see README "GPU"): the exactness of CrypTen's
# CUDA convolution before/after our fix, the GPU correctness test, ResNet-18 timings on GPU
# and CPU of the same machine, and ours against stock CrypTen there. Needs CrypTen and
# omegaconf on PYTHONPATH (.devsite: copies of the venv's pure-Python packages); medmpc is
# linked there the way the editable install links it (each folder as medmpc.<folder>).
set -uo pipefail
mkdir -p .devsite/medmpc
for pkg in mpc models imaging training protocols serving cli; do ln -sfn "$PWD/$pkg" ".devsite/medmpc/$pkg"; done
export PYTHONPATH="$PWD/.devsite" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu_check}"; mkdir -p "$out"
nvidia-smi -L
python3 benchmarks/check_cuda_conv.py | tee "$out/cuda_conv.jsonl"
python3 -m pytest -q -p no:cacheprovider tests/test_inference.py -k gpu 2>&1 | tail -3
if [ "${GPU_CHECK_SIZES:-1}" = 1 ]; then
  for size in 64 224; do for batch in 1 8; do
    timeout 150 python3 -m medmpc.cli.main bench inference --model resnet18 --image-size "$size" --batch "$batch" \
      --device cuda --json | tee -a "$out/bench_gpu.jsonl"
  done; done
fi
timeout 400 python3 -m pytest -q -p no:cacheprovider benchmarks/test_inference.py -k gpu --benchmark-only 2>&1 | tail -3
cp benchmarks/results/inference.json "$out/"
