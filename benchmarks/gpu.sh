#!/usr/bin/env bash
# GPU checks and timings in one go (H100 / H200), under 8 minutes: see benchmarks/gpu_bench.py for what runs.
#
#   benchmarks/gpu.sh                 # from anywhere; JSON into ./gpu-results (or $OUT when set)
#   OUT=/some/dir benchmarks/gpu.sh
#   GPU_BENCH_ARGS="--skip 6,7" benchmarks/gpu.sh   # e.g. without the torch.compile sections
#
# Installs nothing. Works with `pip install -e .` done or without (PYTHONPATH=<repo root> is set here).
# Needs torch with CUDA, numpy and rich (dallecli.console); triton and a C compiler for the compiled sections.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
export OUT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# The interpreter: $PYTHON, else the project's venv, else python3, else python.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in "$ROOT/.venv/bin/python" python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PY="$candidate"; break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu.sh: no Python with torch found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

echo "gpu.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
     "python $PY, results in $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "gpu.sh: nvidia-smi not available"

# 400 s of sections (the script stops starting new ones after that); SIGINT at 450 s makes it print what it
# has; KILL 15 s later if a kernel will not let go. Start-up included, this stays under 8 minutes.
timeout -s INT -k 15 450 "$PY" -m benchmarks.gpu_bench --out "$OUT" --budget-s 400 ${GPU_BENCH_ARGS:-} \
    2>&1 | tee "$OUT/gpu_log.txt"
rc=${PIPESTATUS[0]}
echo "gpu.sh: exit $rc; log $OUT/gpu_log.txt, results $OUT/gpu_results.json"
exit "$rc"
