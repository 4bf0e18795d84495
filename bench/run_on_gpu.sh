#!/usr/bin/env bash
# Run the GPU suite and benchmarks on the GPU machine:
#   bash bench/run_on_gpu.sh --tests [PYTEST ARGS...]   the GPU suite (tests/gpu + the README's example on CUDA),
#                                                      log in bench/results/gpu_suite.log
#   bash bench/run_on_gpu.sh NAME [NAME...]             bench/NAME.py each, writing bench/results/NAME.json
# Installs the carried wheels (.whl/: diffusers, transformers, grpcio, protobuf... that the machine lacks or has
# too old; build/quant_whl/: bitsandbytes and torchao, where carried) into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls build/quant_whl/*.whl 2>/dev/null) \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c 'import torch, diffusers, transformers, grpc; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "diffusers", diffusers.__version__,
  "transformers", transformers.__version__, "grpcio", grpc.__version__)'
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader || true
mkdir -p bench/results
if [ "${1:-}" = "--tests" ]; then
  shift
  log=bench/results/gpu_suite.log
  { date -u; git log -1 --format='commit %H %s' 2>/dev/null || true; } > "$log"
  [ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu_suite.log"  # the log comes back even if the run is cut short
  # A test still running after 200 s gets every thread's stack in the log (pytest's faulthandler), so a hang says where.
  python3 -m pytest -p no:cacheprovider -q -rA -o faulthandler_timeout=200 \
    tests/test_node.py::test_the_readme_python_example_runs_as_written tests/gpu \
    "$@" 2>&1 | tee -a "$log" ${OUT:+"$OUT/gpu_suite.log"}
  exit "${PIPESTATUS[0]}"
fi
status=0
for name in "$@"; do
  echo "=== $name"
  # Results are written under $OUT as they are made, so a run cut short still returns what it measured.
  python3 "bench/$name.py" --out "${OUT:-bench/results}/$name.json" ${BENCH_ARGS:-} 2>&1 | tee "${OUT:-/tmp}/$name.log" \
    || status=1
done
exit $status
