#!/usr/bin/env bash
# One prepared GPU run (under 10 minutes on an H100/H200): the Triton kernels against the float64
# reference (bench/gpu_exact.py: the first call of each of its 12 variants compiles its kernels,
# 1-15 s each), then bench/gpu.py; JSON lines to docs/bench/gpu-exact.jsonl, gpu.jsonl.
# Needs a CUDA torch, triton, einops, pydantic, omegaconf and pyyaml where it runs; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && PY=.venv/bin/python
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
mkdir -p docs/bench "${OUT:-docs/bench}"
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} timeout 200 "$PY" bench/gpu_exact.py --out "${OUT:-docs/bench}/gpu-exact.jsonl" || true
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} timeout 360 "$PY" bench/gpu.py --budget-s 300 --out "${OUT:-docs/bench}/gpu.jsonl" "$@"
