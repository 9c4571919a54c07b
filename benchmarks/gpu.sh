#!/usr/bin/env bash
# The systems benchmark on one CUDA GPU, with a tiny random Llama built here (about 16 MiB,
# the packaged SmolLM2 tokenizer): step times GRPO vs MOPD-2S1F (and TRL's SDPO when TRL
# is installed), the loss kernel at V 49152/151936, and FLOPs against the GPU's matmul rate.
#
#   benchmarks/gpu.sh [OUT_DIR]           default: $OUT, else benchmarks/results/systems-gpu
#   DEVICE=cpu benchmarks/gpu.sh /tmp/x   the same scripts on CPU, to check them
#   TOKENIZER=DIR benchmarks/gpu.sh       a saved copy of that tokenizer (no packaged GGUF needed)
#
# Needs the project installed (`make install`; `pip install -e ".[bench]"` for TRL).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-benchmarks/results/systems-gpu}}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
MODEL="$DIR/tiny-model"
$PY benchmarks/tiny_model.py "$MODEL" --tokenizer "${TOKENIZER:-packaged:smollm2-135m-instruct}"
{ nvidia-smi || true; uptime; } > "$DIR/machine.txt" 2>&1
VARIANTS=grpo,mopd
if $PY -c "import trl" 2>/dev/null; then VARIANTS=grpo,mopd,trl-sdpo; fi
# A bigger batch than on CPU: the tiny model leaves the GPU idle otherwise.
COMMON=(--model "$MODEL" --device "$DEVICE" --prompts 8 --n 8 --max-new-tokens 64)
$PY benchmarks/step_time.py --variants "$VARIANTS" --rounds 2 "${COMMON[@]}" --out "$DIR"
$PY benchmarks/flops.py "${COMMON[@]}" --out "$DIR"
if [ "$DEVICE" = cpu ]; then  # keep a CPU check small
  $PY benchmarks/loss_kernel.py --device cpu --vocab 4096,16384 --batch 1,2 --tokens 256 --out "$DIR"
else
  $PY benchmarks/loss_kernel.py --device "$DEVICE" --full-max-gb 40 --out "$DIR"
fi
rm -rf "$MODEL"
echo "results in $DIR"
