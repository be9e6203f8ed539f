#!/usr/bin/env bash
# Zero-code capture: run an unmodified script under `llmdiff run`, twice, then compare.
#   bash examples/zero_code.sh [tiny|smollm2] [OUT]
set -euo pipefail
model=${1:-smollm2}
out=${2:-runs/zero-code}
here=$(dirname "$0")
rm -rf "$out"
llmdiff run -o "$out/fp32" --steps all -- python "$here/run_script.py" --model "$model" --dtype float32
llmdiff run -o "$out/bf16" --steps all -- python "$here/run_script.py" --model "$model" --dtype bfloat16
llmdiff show "$out/bf16"
# exit code: 0 match, 1 diverged; a healthy bf16 run matches
llmdiff compare "$out/fp32" "$out/bf16" -o "$out/report.md"
