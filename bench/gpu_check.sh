#!/usr/bin/env bash
# The CUDA check, for a GPU machine with no package registry (e.g. one H200 lent through the `device` tool): its
# Python 3.12 holds torch, transformers, safetensors, numpy, pandas, pyarrow, scipy, scikit-learn, pyyaml, rich,
# matplotlib and tokenizers; `make gpu-wheelhouse` (run here first) downloads the rest into .whl/, which travels
# with the working tree.
#   bash bench/gpu_check.sh OUTDIR        (8 minutes at most; writes OUTDIR/*.json and the logs)
# 1. installs .whl/wheels with --no-index into a venv that sees the machine's own packages;
# 2. runs the tests marked `cuda` (in-place builds on CUDA equal the CPU result; a causal-LM search with IRT
#    fitness on CUDA), with a JUnit report;
# 3. runs bench/lm_eval_speed.py on CUDA (the tiny GPT-2, and SmolLM2-135M's architecture with random weights).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
started=$(date +%s)
python3 -m venv --system-site-packages "$OUT/venv" >"$OUT/install.log" 2>&1
PY="$OUT/venv/bin/python"
"$PY" -m pip install --quiet --no-index --find-links "$WHEELS/wheels" pydantic pymoo optuna cmaes jinja2 pytest \
    pytest-timeout >>"$OUT/install.log" 2>&1 || { echo "install failed (see $OUT/install.log)"; exit 3; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MERGE3_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" - <<'PY' >"$OUT/machine.json"
import json, platform, torch
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "gpus": torch.cuda.device_count()}, indent=2))
PY
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs --junitxml="$OUT/cuda-tests.xml" \
    -o addopts="" 2>&1 | tail -30 | tee "$OUT/cuda-tests.log"
tests=${PIPESTATUS[0]}
assets=()
[ -f "$WHEELS/smollm2-135m/config.json" ] && assets=(--smollm2-assets "$WHEELS/smollm2-135m")
timeout 240 "$PY" bench/lm_eval_speed.py --device cuda --threads 4 --repeats 3 --out "$OUT/lm_eval_speed.json" \
    "${assets[@]}" 2>&1 | tail -20 | tee "$OUT/lm_eval_speed.log"
bench=${PIPESTATUS[0]}
echo "{\"cuda_tests_exit\": $tests, \"lm_bench_exit\": $bench, \"seconds\": $(( $(date +%s) - started ))}" \
    >"$OUT/summary.json"
cat "$OUT/summary.json"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
