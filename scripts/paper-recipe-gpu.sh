#!/usr/bin/env bash
# The paper recipe end to end on a CUDA machine, on a tiny random Llama (no downloads, no corpora):
# quantize (calibration, per-token sensitivity, router fits, thresholds), then evaluate
# against the baselines, all with --device cuda; prints each step's wall time. Works from a clone
# (an installed mobiquant, or none: the clone's folders are imported as the package).
#
#   scripts/paper-recipe-gpu.sh [OUT_DIR]          # default OUT_DIR: /tmp/mobiq-paper-gpu
#   DEVICE=cpu RECIPE=fast scripts/paper-recipe-gpu.sh   # the same steps anywhere, in minutes
#   LAYERS=2 ...                                         # decoder blocks of the tiny model (default 1:
#                                                        # ~3 min of calibration per block on an H200)
#
# The checkpoint it writes (OUT_DIR/checkpoint) can be exported where the op library is built:
#   mobiq-export onnx OUT_DIR/checkpoint -o OUT_DIR/model  (needs OUT_DIR/tiny-llama beside it)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-/tmp/mobiq-paper-gpu}"
DEVICE="${DEVICE:-cuda}"
RECIPE="${RECIPE:-paper}"
LAYERS="${LAYERS:-1}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if ! "$PY" -c "import mobiquant.exporter" 2>/dev/null; then  # a bare machine: the clone as the package
  mkdir -p "$OUT/pkg/mobiquant"
  ln -sfn "$ROOT/runtime" "$OUT/pkg/mobiquant/runtime"
  ln -sfn "$ROOT/exporter" "$OUT/pkg/mobiquant/exporter"
  touch "$OUT/pkg/mobiquant/__init__.py"
  export PYTHONPATH="$OUT/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
EXPORT=("$PY" -m mobiquant.exporter.cli)

step() {  # step NAME CMD...: run, print wall time
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@"
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '[paper-recipe-gpu] %-10s %d.%03d s (%s, recipe %s)\n' "$name" $((ms / 1000)) $((ms % 1000)) "$DEVICE" "$RECIPE" \
    | tee -a "$OUT/times.txt"
}

: > "$OUT/times.txt"
"$PY" - "$OUT" "$LAYERS" <<'PY'
import sys, torch
from pathlib import Path
from tiny_llama import write_tiny_llama
out = Path(sys.argv[1])
print(f"[paper-recipe-gpu] torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
write_tiny_llama(out / "tiny-llama", layers=int(sys.argv[2]))
PY
# calibration and evaluation text for a character tokenizer: the project's own sources and docs
find "$ROOT/exporter" "$ROOT/runtime" "$ROOT/docs" -name '*.py' -o -name '*.md' | sort | xargs cat > "$OUT/calib.txt"
head -c 60000 "$ROOT/README.md" > "$OUT/eval.txt"

step quantize "${EXPORT[@]}" quantize "$OUT/tiny-llama" -o "$OUT/checkpoint" --recipe "$RECIPE" --group-size 32 \
  --calib "$OUT/calib.txt" --device "$DEVICE" --quiet
step eval "${EXPORT[@]}" eval "$OUT/checkpoint" --corpus "$OUT/eval.txt" --budgets 3 4 5 8 --baselines \
  --rows fp32 mobiquant static random-3 --context 256 --max-tokens 8192 --device "$DEVICE" --json "$OUT/eval.json"
cat "$OUT/times.txt"
