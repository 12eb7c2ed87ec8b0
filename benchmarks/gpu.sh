#!/usr/bin/env bash
# The GPU benchmarks: DP-SGD step overhead (python -m benchmarks dp), feature extraction
# (python -m benchmarks extract) and foundation-encoder throughput against the bare network
# (python -m benchmarks encoders: UNI-sized ViT-L/16 and Lunit ViT-S/8, bf16) with torch on
# CUDA, then their tables. Under 8 minutes on
# one H100. Never part of CI; run it on a machine with a CUDA GPU and a CUDA torch:
#
#   bash benchmarks/gpu.sh                 # PYTHON=/path/to/python to pick the interpreter
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh   # dry run of this script on a CPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEVICE=${DEVICE:-cuda}
export PYTHONWARNINGS=ignore
"$PY" - "$DEVICE" <<'PYEOF'
import sys
import torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA device; run this on a GPU "
             "machine with a CUDA build of torch (or DEVICE=cpu for a dry run)")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
print(f"torch {torch.__version__} on {name}", flush=True)
PYEOF
if [ -n "${QUICK:-}" ]; then   # a small dry run: checks the script, not the GPU
    DP=(--repeats 2 --bags 2 --instances 200 --features 64 --slides 2 --patches 4)
    EX=(--synthetic 1024x1024 --repeats 1 --encoders resnet-tiny)
    EN=(--encoders lunit-dino --batch 4 --repeats 1)
else
    DP=(--repeats 20 --bags 32 --instances 2000 --features 1024 --slides 32 --patches 16)
    EX=(--synthetic 8192x8192 --repeats 2 --patch-size 224 --encoders resnet-tiny)
    EN=(--encoders lunit-dino uni --batch 256 --repeats 3)
fi
start=$(date +%s)
timeout 300 "$PY" -m benchmarks dp --device "$DEVICE" "${DP[@]}"
timeout 180 "$PY" -m benchmarks extract --device "$DEVICE" "${EX[@]}"
timeout 120 "$PY" -m benchmarks encoders --device "$DEVICE" "${EN[@]}"
echo "gpu.sh: done in $(( $(date +%s) - start )) s"
