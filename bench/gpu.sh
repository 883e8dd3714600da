#!/usr/bin/env bash
# GPU figures on one CUDA GPU (about 7 minutes on an H100): bf16 throughput vs the card's peak, compiled step,
# 1-GPU DDP, plate prediction MP/s, 120 s quality bench vs the plain loop -> bench/gpu.{json,md}.
# Uses .venv when it has a CUDA build of torch, else the python3 on PATH (which must have one).
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  py=.venv/bin/python
fi
export WANDB_MODE=disabled MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$py" bench/gpu.py "$@"
